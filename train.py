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
import hashlib
import json
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
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms
from torchvision.utils import save_image

import clip_loader
import prior
import vqgan

# -----------------------------------------------------------------------------------------------------------
# Command line. Every default lives here, once, next to its help text (shown by --help).


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train CLIP-GEN on a folder of images (no captions).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images, searched recursively (jpg, png, webp, bmp)")
    p.add_argument("--out", default="out", help="run folder for checkpoints, sample grids and caches")
    p.add_argument("--stage", default="all", choices=["vqgan", "prior", "all"],
                   help="'vqgan' = stage 1, 'prior' = stage 2 (needs OUT/vqgan.pt), 'all' = both in turn")
    p.add_argument("--preset", default="paper", choices=sorted(vqgan.PRESETS),
                   help="model sizes of both stages: 'paper' is CLIP-GEN's, 'tiny' trains on a CPU in minutes")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per process per step (both stages)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    g = p.add_argument_group("stage 1: VQGAN")
    g.add_argument("--vqgan-steps", type=int, default=100_000, help="optimizer steps of stage 1")
    g.add_argument("--vqgan-lr", type=float, default=1e-4, help="Adam learning rate of the VQGAN and discriminator")
    g.add_argument("--disc-start", type=int, default=10_000,
                   help="step at which the adversarial loss and discriminator training start (taming's "
                        "disc_start): the GAN only helps once reconstructions are roughly right")
    g.add_argument("--perceptual", default="vgg", choices=["vgg", "none"],
                   help="perceptual loss network; 'vgg' downloads torchvision's VGG16 weights once")
    g = p.add_argument_group("stage 2: prior")
    g.add_argument("--clip", default="ViT-B/32", help="CLIP model name or checkpoint path (see clip_loader.py)")
    g.add_argument("--prior-steps", type=int, default=100_000, help="optimizer steps of stage 2")
    g.add_argument("--prior-lr", type=float, default=3e-4, help="peak AdamW learning rate of the prior")
    g.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps, then cosine decay to 10%%")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    g.add_argument("--embed-loss-weight", type=float, default=0.1,
                   help="lambda of CLIP-GEN's embedding-reconstruction loss (0: off). The paper gives no "
                        "value we could confirm; 0.1 keeps it below the cross-entropy's scale")
    g.add_argument("--embed-loss-every", type=int, default=4, help="compute the embedding loss every k steps")
    g.add_argument("--embed-loss-batch", type=int, default=4, help="...on this many images of the batch")
    g.add_argument("--gumbel-tau", type=float, default=1.0, help="Gumbel-softmax temperature of that loss")
    g.add_argument("--gumbel-hard", action="store_true", help="straight-through one-hot Gumbel samples")
    g.add_argument("--pseudo-text-alpha", type=float, default=0.0,
                   help="noise level of pseudo-text embeddings (CLIP-VQDiffusion/LAFITE); 0: off, as CLIP-GEN")
    g.add_argument("--cond-drop", type=float, default=0.1,
                   help="probability of training with the null condition, for classifier-free guidance")
    g.add_argument("--adaln", action="store_true", help="adaptive-LayerNorm conditioning in every block")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed (each process adds its rank)")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints and sample grids")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU/process")
    g.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = vqgan.PRESETS[args.preset].image_size
    downsample = vqgan.PRESETS[args.preset].downsample
    if args.image_size % downsample:
        p.error(f"--image-size must be a multiple of {downsample} for preset {args.preset!r}")
    for name in ("batch_size", "vqgan_steps", "prior_steps", "log_every", "save_every", "embed_loss_every",
                 "embed_loss_batch"):
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


def train_vqgan(args, paths, rank, world, device):
    master = rank == 0
    torch.manual_seed(args.seed + rank)  # different crops and flips on every rank
    cfg = vqgan.PRESETS[args.preset]
    cfg = vqgan.VQGANConfig(**{**asdict(cfg), "image_size": args.image_size})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # Data
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
    opt_g = torch.optim.Adam(model.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9))
    start = 0
    ckpt_path = os.path.join(args.out, "vqgan.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = vqgan.load_checkpoint(ckpt_path, "vqgan")
        model.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        start = ckpt["step"]
        if master:
            print(f"resuming stage 1 from {ckpt_path} at step {start}")
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
                        ckpt_path)
        with torch.no_grad():
            recon = raw_model(preview.to(device))[0].float().clamp(-1, 1).cpu()
        # Top row: inputs; bottom row: reconstructions.
        save_image(torch.cat([preview, recon]) * 0.5 + 0.5, os.path.join(args.out, f"vqgan_{step:07d}.png"),
                   nrow=len(preview))

    # Training loop
    t0, last_log = time.time(), time.time()
    for step in range(start + 1, args.vqgan_steps + 1):
        images = next(batches).to(device, non_blocking=True)
        gan_on = step > args.disc_start
        recon, logs = generator_step(model, raw_model, disc, perceptual, opt_g, images, gan_on, autocast,
                                     check_dead_codes=step % 10 == 0)  # the check waits for the GPU: not every step
        logs["disc"] = discriminator_step(disc, opt_d, images, recon, autocast) if gan_on else \
            torch.zeros((), device=device)

        if step % args.log_every == 0 or step == args.vqgan_steps:
            logs = mean_over_ranks(logs, device)
            if master:
                now = time.time()
                speed = args.log_every * args.batch_size * world / (now - last_log)
                eta = (now - t0) / (step - start) * (args.vqgan_steps - step)
                print(f"step {step:>6}/{args.vqgan_steps} | loss {logs['loss']:.4f} rec {logs['rec']:.4f} "
                      f"codebook {logs['codebook']:.4f} gan {logs['gan']:+.3f} (w {logs['gan_weight']:.3f}) "
                      f"disc {logs['disc']:.3f} | psnr {logs['psnr']:.2f} dB | codes used "
                      f"{raw_model.quantizer.usage(args.log_every):.1%} ppl {logs['ppl']:.1f} | "
                      f"{speed:.1f} img/s | eta {format_eta(eta)}", flush=True)
            last_log = time.time()
        if master and (step % args.save_every == 0 or step == args.vqgan_steps):
            checkpoint(step)
    if master:
        print(f"stage 1 done: {ckpt_path}")


# -----------------------------------------------------------------------------------------------------------
# Stage 2: the prior (prior.py), trained on a cache of every image's VQGAN tokens and CLIP embedding.


def file_sha256(path):
    return clip_loader.sha256_of(path)


def cache_key(paths, vqgan_path, clip_name, image_size):
    """A digest of everything the cached tokens and embeddings depend on: the VQGAN weights, the CLIP, the
    image size and the image files (path, size, mtime). Any change gives a new key and a new cache."""
    clip_id = clip_name if clip_name in clip_loader.MODELS else file_sha256(clip_name)
    files = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    blob = json.dumps([file_sha256(vqgan_path), clip_id, image_size, files])
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def build_cache(paths, vq, clip_model, image_size, batch_size, device):
    """Encode every image (center crop, and its mirror image) once: VQGAN token ids (2N, n_tokens) and
    CLIP image embeddings (2N, clip_dim). Row 2i is image i, row 2i + 1 its horizontal flip."""
    dataset = ImageFolder(paths, image_size, train=False)
    tokens, embeddings = [], []
    for i in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]).to(device)
        x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # (b, 3, S, S) -> (2b, 3, S, S), interleaved
        tokens.append(vq.encode(x).flatten(1).to(torch.int32).cpu())  # (2b, h*w)
        clip_in = clip_loader.preprocess_tensor(x, clip_model.arch.image_resolution)
        embeddings.append(clip_model.encode_image(clip_in).float().cpu())  # (2b, clip_dim)
    return torch.cat(tokens), torch.cat(embeddings)


def load_frozen_models(args, device):
    """The trained VQGAN and the CLIP, frozen (no gradients, eval mode): stage 2 only reads them."""
    vqgan_path = os.path.join(args.out, "vqgan.pt")
    if not os.path.exists(vqgan_path):
        sys.exit(f"error: no VQGAN checkpoint at {vqgan_path}. Train stage 1 first "
                 f"(python train.py --data {args.data} --out {args.out} --stage vqgan) or use --stage all")
    try:
        vq, _ = vqgan.load_vqgan(vqgan_path, device)
        clip_model, _ = clip_loader.load(args.clip, device=device)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    return vqgan_path, vq.requires_grad_(False), clip_model.requires_grad_(False)


def lr_at(step, args):
    """Linear warm-up to --prior-lr, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.prior_lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.prior_steps - args.warmup)
    return args.prior_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def prior_step(model, raw_model, opt, tokens, embeddings, with_embed_loss, vq, clip_model, args, autocast):
    """One prior update. tokens (B, n_tokens) long, embeddings (B, clip_dim). Returns scalars to log."""
    B = tokens.shape[0]
    drop = torch.rand(B, device=tokens.device) < args.cond_drop  # null condition for these rows (CFG)
    condition = prior.pseudo_text_embedding(embeddings, args.pseudo_text_alpha)
    with autocast:
        logits, _ = model(condition, tokens[:, :-1], drop)  # (B, n_tokens, vocab)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        embed_loss = torch.zeros((), device=tokens.device)
        if with_embed_loss:
            k = min(args.embed_loss_batch, B)
            # Reconstruct the true image embedding (not the noisy one): that is what the image is.
            embed_loss = prior.embedding_reconstruction_loss(logits[:k], embeddings[:k], vq, clip_model,
                                                             args.gumbel_tau, args.gumbel_hard)
    loss = ce + args.embed_loss_weight * embed_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
    opt.step()
    return {"loss": loss.detach(), "ce": ce.detach(), "embed": embed_loss.detach()}


def train_prior(args, paths, rank, world, device):
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    vqgan_path, vq, clip_model = load_frozen_models(args, device)

    # The cache: built once by rank 0, read by every rank.
    key = cache_key(paths, vqgan_path, args.clip, args.image_size)
    cache_path = os.path.join(args.out, f"prior_cache_{key[:16]}.pt")
    if master and not os.path.exists(cache_path):
        print(f"encoding {len(paths)} images (and their mirror images) with the VQGAN and CLIP -> {cache_path}")
        tokens, embeddings = build_cache(paths, vq, clip_model, args.image_size, args.batch_size, device)
        save_checkpoint({"key": key, "tokens": tokens, "embeddings": embeddings, "paths": paths}, cache_path)
    elif master:
        print(f"using cached tokens and embeddings {cache_path}")
    if dist.is_initialized():
        dist.barrier()
    cache = torch.load(cache_path, map_location="cpu", weights_only=True)
    tokens, embeddings = cache["tokens"].long(), cache["embeddings"]

    # Hold out a few images (both flips) for the sample grids: they show generalisation, not memory.
    n_holdout = min(4, len(paths) // 5)
    preview_ids = range(len(paths) - n_holdout, len(paths)) if n_holdout else range(min(4, len(paths)))
    preview = torch.stack([ImageFolder(paths, args.image_size, train=False)[i] for i in preview_ids])
    preview_emb = embeddings[[2 * i for i in preview_ids]]
    n_train = 2 * (len(paths) - n_holdout)
    tokens, embeddings = tokens[:n_train], embeddings[:n_train]

    cfg = prior.PRESETS[args.preset]
    cfg = prior.PriorConfig(**{**asdict(cfg), "vocab_size": vq.cfg.codebook_size, "n_tokens": tokens.shape[1],
                               "clip_dim": embeddings.shape[1], "adaln": args.adaln})
    model = prior.Prior(cfg).to(device)
    # Weight decay on matrices only; biases, norms and embeddings-as-vectors are left alone (as in nanoGPT).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.prior_lr, betas=(0.9, 0.95))
    start = 0
    ckpt_path = os.path.join(args.out, "prior.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = vqgan.load_checkpoint(ckpt_path, "prior")
        if ckpt["config"]["clip_dim"] != cfg.clip_dim:
            sys.exit(f"error: {ckpt_path} was trained with a CLIP of embedding size {ckpt['config']['clip_dim']} "
                     f"({ckpt['clip']}), but --clip {args.clip} gives {cfg.clip_dim}; pass --clip {ckpt['clip']}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        if master:
            print(f"resuming stage 2 from {ckpt_path} at step {start}")
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        print(f"prior {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M params "
              f"({cfg.n_layer} layers, width {cfg.n_embd}, {'prefix + adaLN' if cfg.adaln else 'prefix'} conditioning) | "
              f"{n_train} training sequences of {cfg.n_tokens} tokens, {n_holdout} images held out | "
              f"CLIP {args.clip} ({cfg.clip_dim}-d) | global batch {args.batch_size * world} "
              f"= {args.batch_size * world * cfg.n_tokens} tokens/step | lr {args.prior_lr} | device {device} x{world}")

    def checkpoint(step):
        save_checkpoint({"kind": "prior", "config": asdict(cfg), "model": raw_model.state_dict(),
                         "optimizer": opt.state_dict(), "step": step, "clip": args.clip,
                         "vqgan": os.path.abspath(vqgan_path), "vqgan_sha256": file_sha256(vqgan_path),
                         "args": vars(args)}, ckpt_path)
        raw_model.eval()
        samples = raw_model.sample(preview_emb.to(device), temperature=1.0, top_k=100,
                                   generator=torch.Generator(device).manual_seed(args.seed))
        side = math.isqrt(cfg.n_tokens)
        with torch.no_grad(), autocast:
            images = vq.decode(samples.view(-1, side, side)).float().clamp(-1, 1).cpu()
        raw_model.train()
        # Top row: held-out images; bottom row: the prior's samples from their CLIP embeddings.
        save_image(torch.cat([preview, images]) * 0.5 + 0.5, os.path.join(args.out, f"prior_{step:07d}.png"),
                   nrow=len(preview))

    # Training loop over random batches of the cache (each rank draws its own rows; per-rank seeds differ).
    t0 = last_log = time.time()
    embed_loss = torch.zeros((), device=device)
    for step in range(start + 1, args.prior_steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args)
        rows = torch.randint(n_train, (args.batch_size,))
        with_embed = args.embed_loss_weight > 0 and step % args.embed_loss_every == 0
        logs = prior_step(model, raw_model, opt, tokens[rows].to(device), embeddings[rows].to(device),
                          with_embed, vq, clip_model, args, autocast)
        if with_embed:
            embed_loss = logs["embed"]
        if step % args.log_every == 0 or step == args.prior_steps:
            logs = mean_over_ranks({"ce": logs["ce"], "embed": embed_loss}, device)
            if master:
                now = time.time()
                speed = args.log_every * args.batch_size * world * cfg.n_tokens / (now - last_log)
                eta = (now - t0) / (step - start) * (args.prior_steps - step)
                print(f"step {step:>6}/{args.prior_steps} | ce {logs['ce']:.4f} embed {logs['embed']:.4f} | "
                      f"lr {lr_at(step - 1, args):.2e} | {speed:,.0f} tokens/s | eta {format_eta(eta)}", flush=True)
            last_log = time.time()
        if master and (step % args.save_every == 0 or step == args.prior_steps):
            checkpoint(step)
    if master:
        print(f"stage 2 done: {ckpt_path}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        paths = readable_images(find_images(args.data))
        if args.stage in ("vqgan", "all"):
            train_vqgan(args, paths, rank, world, device)
        if args.stage in ("prior", "all"):
            train_prior(args, paths, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
