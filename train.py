"""
train.py: trains CLIP-GEN from images alone (a folder, or WebDataset tar shards), no captions needed.

    python train.py --data imgs/                                   # both stages, paper sizes (a GPU job)
    python train.py --data imgs/ --stage vqgan                     # stage 1 only; --stage prior for stage 2
    python train.py --data imgs/ --prior diffusion                 # CLIP-VQDiffusion's prior instead of the GPT
    python train.py --data imgs/ --preset tiny --vqgan-steps 2000 --prior-steps 2000 --disc-start 1000 \\
        --perceptual none                                          # small models that train on a CPU
    torchrun --nproc_per_node=8 train.py --data imgs/              # the same on 8 GPUs (DDP)
    torchrun --nproc_per_node=8 train.py --data 'shards/{00000..00999}.tar'   # tar shards (img2dataset's)

Reads top to bottom: the command line, stage 1 (the VQGAN), stage 2 (the prior), main, then the plumbing
both stages share (distributed set-up, checkpoints, random states, signals, the NaN guard). The losses
themselves live in the model files (vqgan.generator_loss; prior.clipgen_loss, or diffusion.diffusion_loss
with --prior diffusion); this script orchestrates. Under torchrun every process runs all of it on its share
of each batch; rank 0 alone prints and writes files. Single-process training is the same code with a world
size of 1.

Steps are counted from 0: `step` is the number of optimizer updates done, and so also the index of the
next one. The data, learning rate and random draws of update `step` are functions of `step` alone, which
is what makes a resumed run equal an uninterrupted one and 2 processes equal 1.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import save_image

import clip_loader
import data
import diffusion
import prior
import vqgan

# -----------------------------------------------------------------------------------------------------------
# Command line. Every default lives here, once, next to its help text (shown by --help and in the README).

# Each preset's training recipe: what a flag left out means with that preset (model sizes are in
# vqgan.PRESETS and prior.PRESETS). "paper" follows taming and CLIP-GEN; "small" is measured on the toy world
# (README) to train both stages on 3,000 64-px images in under 30 minutes on 2 CPU cores; "tiny" checks the
# plumbing in minutes.
RECIPES = {
    "paper": dict(batch_size=8, vqgan_steps=100_000, vqgan_lr=1e-4, disc_start=10_000, prior_steps=100_000,
                  prior_lr=3e-4, perceptual="vgg"),
    # disc_start past the last step: the small recipe trains without the GAN (measured worse at its budget).
    "small": dict(batch_size=16, vqgan_steps=1200, vqgan_lr=5e-4, disc_start=100_000, prior_steps=2500,
                  prior_lr=1e-3, perceptual="none"),
    "tiny": dict(batch_size=8, vqgan_steps=2000, vqgan_lr=5e-4, disc_start=1000, prior_steps=2000, prior_lr=1e-3,
                 perceptual="none"),
}


def recipe_help(text, name):
    return f"{text} (default: the preset's; " + ", ".join(f"{p} {r[name]}" for p, r in RECIPES.items()) + ")"


def build_parser():
    p = argparse.ArgumentParser(description="Train CLIP-GEN on a folder of images (no captions).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True,
                   help="images: a folder searched recursively for jpg/png/webp/bmp files and .tar shards "
                        "(WebDataset layout), one .tar, or a shard pattern such as 'shards/{00000..00099}.tar'")
    p.add_argument("--out", default="out", help="run folder for checkpoints, sample grids and caches")
    p.add_argument("--stage", default="all", choices=["vqgan", "prior", "all"],
                   help="'vqgan' = stage 1, 'prior' = stage 2 (needs OUT/vqgan.pt), 'all' = both in turn")
    p.add_argument("--preset", default="paper", choices=sorted(vqgan.PRESETS),
                   help="model sizes and training recipe: 'paper' is CLIP-GEN's, 'small' trains 64-px images on 2 "
                        "CPU cores in about 30 minutes, 'tiny' checks the plumbing in minutes")
    p.add_argument("--image-size", type=int, default=None,
                   help="stage-1 training resolution (default: the preset's); stage 2 uses vqgan.pt's")
    p.add_argument("--batch-size", type=int, help=recipe_help("images per process per step (both stages)", "batch_size"))
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; global batch = batch size x this x processes")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly where the run in --out stopped (weights, optimizers, step, data "
                        "position, random state)")
    p.add_argument("--overwrite", action="store_true",
                   help="train from step 0 even though --out holds checkpoints of the stages to train (they are "
                        "replaced); without it, or --resume, such a run is refused")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="step checkpoints kept in OUT/checkpoints")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (faster on GPU after a warm-up)")
    g = p.add_argument_group("stage 1: VQGAN")
    g.add_argument("--vqgan-steps", type=int, help=recipe_help("optimizer steps of stage 1", "vqgan_steps"))
    g.add_argument("--vqgan-lr", type=float,
                   help=recipe_help("Adam learning rate of the VQGAN and discriminator", "vqgan_lr"))
    g.add_argument("--disc-start", type=int,
                   help=recipe_help("step at which the adversarial loss and discriminator training start (taming's "
                                    "disc_start): the GAN only helps once reconstructions are roughly right",
                                    "disc_start"))
    g.add_argument("--perceptual", choices=["vgg", "none"],
                   help=recipe_help("perceptual loss network; 'vgg' downloads torchvision's VGG16 weights once",
                                    "perceptual"))
    g.add_argument("--hue-jitter", type=float, default=0.0,
                   help="rotate the hues of each stage-1 training image by up to +-this fraction of the colour "
                        "wheel, so the tokenizer sees each shape in colours near the ones it came in and does not "
                        "tie shapes to colours; 0: off. In the README's toy world 0.1 makes 99-100%% of "
                        "reconstructions right, but priors trained on its tokens answer fewer prompts right")
    g = p.add_argument_group("stage 2: prior")
    g.add_argument("--prior", default="ar", choices=["ar", "diffusion"],
                   help="'ar' = CLIP-GEN's GPT over the tokens (prior.py); 'diffusion' = CLIP-VQDiffusion's discrete "
                        "diffusion model (diffusion.py). Both take the flags below unless a flag says otherwise")
    g.add_argument("--clip", default="ViT-B/32", help="CLIP model name or checkpoint path (see clip_loader.py)")
    g.add_argument("--prior-steps", type=int, help=recipe_help("optimizer steps of stage 2", "prior_steps"))
    g.add_argument("--prior-lr", type=float, help=recipe_help("peak AdamW learning rate of the prior", "prior_lr"))
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps, then cosine decay to 10%% (default: 1000, or a tenth of "
                        "--prior-steps if that is less)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the prior's matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    g.add_argument("--embed-loss-weight", type=float, default=None,
                   help="lambda of CLIP-GEN's embedding-reconstruction loss, GPT prior only (0: off). The paper "
                        "gives no value we could confirm; 0.1 keeps it below the cross-entropy's scale (default: "
                        "0.1 with --prior ar, 0 with --prior diffusion)")
    g.add_argument("--aux-loss-weight", type=float, default=diffusion.AUX_LOSS_WEIGHT,
                   help="lambda of VQ-Diffusion's auxiliary x0 cross-entropy, diffusion prior only (0: the "
                        "variational bound alone)")
    g.add_argument("--embed-loss-every", type=int, default=4, help="compute the embedding loss every k steps")
    g.add_argument("--embed-loss-batch", type=int, default=4, help="...on this many images of the batch")
    g.add_argument("--gumbel-tau", type=float, default=1.0, help="Gumbel-softmax temperature of that loss")
    g.add_argument("--gumbel-hard", action="store_true", help="straight-through one-hot Gumbel samples")
    g.add_argument("--pseudo-text-alpha", type=float, default=0.0,
                   help="noise level of pseudo-text embeddings (CLIP-VQDiffusion/LAFITE); 0: off, as CLIP-GEN")
    g.add_argument("--cond-drop", type=float, default=0.1,
                   help="probability of training with the null condition, for classifier-free guidance")
    g.add_argument("--adaln", action="store_true",
                   help="adaptive-LayerNorm conditioning in every block of the GPT (the diffusion prior always has it)")
    g.add_argument("--remove-mean", action="store_true",
                   help="project the training images' mean CLIP embedding out of every condition, images' and "
                        "prompts' alike (ours, aimed at CLIP's modality gap; measured in the README's toy world)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed of data order, augmentation and initialisation")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints and sample grids")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per GPU/process (default: 4, or the CPU cores if fewer)")
    g.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    return p


def parse_args(argv=None):
    """The command line, checked whole before anything expensive starts."""
    p = build_parser()
    args = p.parse_args(argv)
    for name, value in RECIPES[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup is None:
        args.warmup = min(1000, max(1, args.prior_steps // 10))
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1)
    if args.embed_loss_weight is None:
        args.embed_loss_weight = 0.1 if args.prior == "ar" else 0.0
    if args.prior == "diffusion" and args.embed_loss_weight > 0:
        p.error("--embed-loss-weight is CLIP-GEN's loss for the GPT prior; the diffusion prior does not use it")
    if args.prior == "ar" and args.aux_loss_weight != diffusion.AUX_LOSS_WEIGHT:
        p.error("--aux-loss-weight weighs a loss of the diffusion prior; add --prior diffusion, or drop it")
    if args.prior == "diffusion" and args.adaln:
        p.error("--adaln is an option of the GPT prior; the diffusion prior is always conditioned by adaLN")
    for name in ("batch_size", "grad_accum", "keep_checkpoints", "vqgan_steps", "prior_steps", "log_every",
                 "save_every", "embed_loss_every", "embed_loss_batch", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("vqgan_lr", "prior_lr", "gumbel_tau"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("workers", "disc_start", "weight_decay", "grad_clip", "embed_loss_weight", "aux_loss_weight",
                 "pseudo_text_alpha"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= args.cond_drop < 1:
        p.error("--cond-drop must be in [0, 1)")
    if not 0 <= args.hue_jitter <= 0.5:
        p.error("--hue-jitter must be in [0, 0.5] (a fraction of the colour wheel either way)")
    downsample = vqgan.PRESETS[args.preset].downsample
    if args.image_size is not None and (args.image_size < downsample or args.image_size % downsample):
        p.error(f"--image-size must be a positive multiple of {downsample} for preset {args.preset!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a file; name a folder for the run")
    stages = {"all": ("vqgan", "prior"), "vqgan": ("vqgan",), "prior": ("prior",)}[args.stage]
    trained = [f"{k}.pt" for k in stages if os.path.exists(os.path.join(args.out, f"{k}.pt"))]
    if trained and not (args.resume or args.overwrite):
        p.error(f"--out {args.out!r} already holds {' and '.join(trained)}; continue that run with --resume, train "
                f"into another --out, or pass --overwrite to replace it")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one")
    if "prior" in stages and args.clip not in clip_loader.MODELS and not os.path.isfile(args.clip):
        p.error(f"--clip {args.clip!r} is neither a model name ({', '.join(clip_loader.MODELS)}) nor a file")
    return args


# -----------------------------------------------------------------------------------------------------------
# Stage 1: the VQGAN (vqgan.py), trained on random crops of the images.

PREVIEW_IMAGES = 8  # images in each stage-1 grid (training images, center crops: inputs over reconstructions)
DEAD_CODE_CHECK_EVERY = 10  # steps between dead-code checks; each one waits for the GPU


def generator_step(model, raw_model, raw_disc, perceptual, opt_g, micro_batches, gan_on, autocast,
                   check_dead_codes=True):
    """One update of the encoder, codebook and decoder over micro-batches (gradient accumulation), with
    vqgan.generator_loss. The discriminator is called unwrapped and frozen, so this step can never change
    it. Returns the detached reconstructions and a dict of scalar tensors (means over micro-batches)."""
    n = len(micro_batches)
    raw_disc.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    recons, logs = [], {}
    for i, images in enumerate(micro_batches):
        with sync_gradients(model, i == n - 1):
            with autocast:
                recon, ids, codebook_loss = model(images)
                fake_logits = raw_disc(recon) if gan_on else None
                loss, parts = vqgan.generator_loss(images, recon, codebook_loss, fake_logits,
                                                   raw_model.decoder.conv_out.weight, raw_model.cfg, perceptual)
            (loss / n).backward()
        recons.append(recon.detach())
        parts |= {"psnr": vqgan.psnr(recon.detach(), images),
                  "ppl": vqgan.codebook_perplexity(ids, raw_model.cfg.codebook_size)}
        logs = {k: logs.get(k, 0) + v / n for k, v in parts.items()}
    opt_g.step()
    raw_model.quantizer.restart_dead_codes(check=check_dead_codes)
    return recons, logs


def discriminator_step(disc, raw_disc, opt_d, micro_batches, recons, autocast):
    """One PatchGAN update with the hinge loss; `recons` are detached, so no gradient reaches the VQGAN."""
    raw_disc.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    total = 0.0
    for i, (images, recon) in enumerate(zip(micro_batches, recons)):
        with sync_gradients(disc, i == len(recons) - 1):
            with autocast:
                d_loss = vqgan.hinge_d_loss(disc(images).float(), disc(recon).float())
            (d_loss / len(recons)).backward()
        total = total + d_loss.detach() / len(recons)
    opt_d.step()
    return total


def train_vqgan(args, images, proc):
    cuda = proc.device.type == "cuda"
    torch.manual_seed(args.seed + proc.rank)
    cfg = vqgan.PRESETS[args.preset]
    cfg = replace(cfg, image_size=args.image_size or cfg.image_size)
    per_rank = args.batch_size * args.grad_accum
    if len(images) < per_rank * proc.world:
        fail(f"{len(images)} images are fewer than one global batch ({per_rank * proc.world}); "
             f"lower --batch-size or --grad-accum")
    ckpt, ckpt_path = latest_checkpoint(args, "vqgan", proc)
    if ckpt is not None:
        refuse_changed_run(ckpt, ckpt_path, asdict(cfg), args, per_rank * proc.world)
        cfg = vqgan.VQGANConfig(**ckpt["config"])  # the run describes itself
    start = ckpt["step"] if ckpt is not None else 0
    if start >= args.vqgan_steps:  # `--stage all --resume` after stage 1 had finished
        return

    # Models and optimizers (Adam with beta1 = 0.5, as taming: GAN training is unstable with more momentum).
    # channels_last (NHWC) lets cuDNN use tensor-core convolution kernels without layout transposes, and on a
    # CPU saves oneDNN its layout reorders (1.10x at 256 px on 2 cores, bench.py --peers; equal at 64 px).
    memory_format = torch.channels_last
    raw_model = vqgan.VQGAN(cfg).to(proc.device, memory_format=memory_format)
    raw_disc = vqgan.PatchDiscriminator(cfg).to(proc.device, memory_format=memory_format)
    perceptual = None
    if args.perceptual == "vgg":
        try:
            perceptual = vqgan.PerceptualLoss().to(proc.device, memory_format=memory_format)
        except RuntimeError as e:
            fail(e)
    opt_g = torch.optim.Adam(raw_model.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9), fused=cuda)
    opt_d = torch.optim.Adam(raw_disc.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9), fused=cuda)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        raw_disc.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
    if args.compile:
        # The adaptive GAN weight differentiates twice through the same graph (retain_graph=True), which
        # compiled backward passes that reuse ("donate") their saved buffers forbid; keep them.
        torch._functorch.config.donated_buffer = False
    model, disc = wrap_model(raw_model, args, proc), wrap_model(raw_disc, args, proc)

    # Data: this process's share of each step's images from step `start` on, decoded and augmented by worker
    # processes in parallel with the step; pinned memory lets the copy to the GPU run asynchronously.
    dataset = data.ImageFolder(images, cfg.image_size, seed=args.seed, hue_jitter=args.hue_jitter)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=cuda,
                        sampler=data.StepSampler(len(images), per_rank, proc.rank, proc.world, args.seed, start),
                        persistent_workers=args.workers > 0)
    batches = iter(loader)  # before the random state is restored: creating the iterator draws a seed
    preview = torch.stack([dataset[i] for i in range(min(PREVIEW_IMAGES, len(images)))])
    if proc.master:
        side = cfg.tokens_per_side
        print(f"VQGAN {millions(raw_model)}M params, discriminator {millions(raw_disc)}M | {len(images)} images, "
              f"{cfg.image_size}px -> {side}x{side} tokens, codebook {cfg.codebook_size} | device {proc.device} "
              f"x{proc.world} {'bf16 autocast' if cuda else 'float32'} | global batch {per_rank * proc.world} "
              f"({args.batch_size} x {args.grad_accum} accumulation x {proc.world} processes)")
        if ckpt is not None:
            print(f"resuming stage 1 from {ckpt_path} at step {start}")

    # The random state is restored last, after everything above has drawn from it.
    if ckpt is not None:
        restore_process_state(ckpt["rng"], proc)
    stop, guard, meter = GracefulStop(), NonFiniteGuard(proc.device, last_good=ckpt_path), Meter(start)
    step = start
    while step < args.vqgan_steps:
        # One optimizer update = grad_accum micro-batches of --batch-size images on each process.
        micro = [next(batches).to(proc.device, non_blocking=True, memory_format=memory_format)
                 for _ in range(args.grad_accum)]
        # Taming starts the adversarial loss late: a GAN on top of blurry early reconstructions mostly teaches
        # the decoder texture noise, and an early discriminator wins too easily to give useful gradients.
        gan_on = step >= args.disc_start
        recons, logs = generator_step(model, raw_model, raw_disc, perceptual, opt_g, micro, gan_on, proc.autocast(),
                                      check_dead_codes=step % DEAD_CODE_CHECK_EVERY == 0)
        logs["disc"] = discriminator_step(disc, raw_disc, opt_d, micro, recons, proc.autocast()) if gan_on \
            else torch.zeros((), device=proc.device)
        guard.update(logs["loss"], step)  # on the device: no waiting for the GPU on ordinary steps
        step += 1

        # Logging is the one place a step waits for the GPU (.tolist() in mean_over_ranks), so it is rare.
        if step % args.log_every == 0 or step == args.vqgan_steps:
            guard.check()
            logs = mean_over_ranks(logs, proc.device)
            if proc.master:
                print(f"step {step:>6}/{args.vqgan_steps} | loss {logs['loss']:.4f} rec {logs['rec']:.4f} "
                      f"codebook {logs['codebook']:.4f} gan {logs['gan']:+.3f} (w {logs['gan_weight']:.3f}) "
                      f"disc {logs['disc']:.3f} | psnr {logs['psnr']:.2f} dB | codes used "
                      f"{raw_model.quantizer.usage(args.log_every):.1%} ppl {logs['ppl']:.1f} | "
                      f"{meter.rate(step, per_rank * proc.world):.1f} img/s | eta {meter.eta(step, args.vqgan_steps)}",
                      flush=True)
        stopping = stop.requested(step, proc.device)
        if step % args.save_every == 0 or step == args.vqgan_steps or stopping:
            guard.check()
            ckpt = {"kind": "vqgan", "config": asdict(cfg), "model": raw_model.state_dict(),
                    "discriminator": raw_disc.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                    "step": step, "rng": gather_process_states(proc), "global_batch": per_rank * proc.world,
                    "args": vars(args)}
            guard.last_good = save_rotating(ckpt, args, "vqgan", step, proc)
            if proc.master:
                save_vqgan_grid(raw_model, preview, os.path.join(args.out, f"vqgan_{step:07d}.png"), proc.device)
        if stopping:
            stop.exit(step, proc)
    if proc.master:
        print(f"stage 1 done: {os.path.join(args.out, 'vqgan.pt')}")


@torch.no_grad()
def save_vqgan_grid(model, preview, path, device):
    """Training images (center crops) over their reconstructions: stage 1's visual log."""
    model.eval()  # in train mode the quantizer would count the preview as codebook use
    recon = model(preview.to(device))[0].float().clamp(-1, 1).cpu()
    model.train()
    save_grid(preview, recon, path)


# -----------------------------------------------------------------------------------------------------------
# Stage 2: the prior (prior.py), trained on a cache of every image's VQGAN tokens and CLIP embedding.

HOLDOUT_IMAGES = 4  # images kept out of stage-2 training, shown in its grids (at most a fifth of the images)


# The cache is a folder of chunk files of consecutive images (and their mirror images): tokens in the
# smallest integer type the codebook fits, embeddings in fp16. Processes encode the chunks round-robin and
# write each one when it is complete, so a killed build keeps its finished chunks and the next run encodes
# only the rest. Chunk boundaries depend on the number of images alone, and encoder batches never straddle
# chunks and have a fixed size, so the bytes of the cache do not depend on how many processes built it.
CACHE_CHUNKS = 64  # about this many chunks, so that up to 64 processes share the encoding...
CACHE_CHUNK_MAX = 4096  # ...but no more images than this per chunk (a killed build loses at most that)
CACHE_BATCH = 32  # images per encoder batch (x2 with the mirror images)


def cache_chunk_size(n_images):
    return min(CACHE_CHUNK_MAX, math.ceil(n_images / CACHE_CHUNKS))


def cache_chunks(n_images):
    """The image indices of each cache chunk: consecutive ranges of cache_chunk_size images."""
    size = cache_chunk_size(n_images)
    return [range(start, min(start + size, n_images)) for start in range(0, n_images, size)]


def cache_key(fingerprint, vqgan_sha256, clip_name, image_size):
    """A digest of everything the cached tokens and embeddings depend on: the images (scan_data's
    fingerprint of the sources' paths, sizes and times), the VQGAN weights (their file's SHA-256), the CLIP,
    the image size and the chunk size. Any change gives a new key and a new cache."""
    clip_id = clip_name if clip_name in clip_loader.MODELS else data.sha256_of(clip_name)
    blob = json.dumps([fingerprint, vqgan_sha256, clip_id, image_size, CACHE_CHUNKS, CACHE_CHUNK_MAX])
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_file(folder, kind, chunk):
    return os.path.join(folder, f"{kind}_{chunk:05d}.npy")


def read_rows(array, rows):
    """Rows of a cache array as a tensor: token ids as int64 (what nn.Embedding takes), embeddings as fp32."""
    out = array[rows]
    return torch.from_numpy(out.astype(np.float32 if out.dtype == np.float16 else np.int64))


@torch.no_grad()
def build_cache(images, vq, clip_model, folder, proc, stop, workers=0):
    """Encode this process's missing chunks of the cache in `folder`: per image i, rows 2i (a center crop)
    and 2i + 1 (its mirror image) of VQGAN token ids (uint16/int32) and CLIP image embeddings (fp16).
    DataLoader workers decode the images in parallel. A signal (`stop`) ends the build between batches;
    finished chunks stay, the one in progress is dropped."""
    os.makedirs(folder, exist_ok=True)
    dataset = data.ImageFolder(images, vq.cfg.image_size)
    token_dtype = np.uint16 if vq.cfg.codebook_size <= 1 << 16 else np.int32
    chunks = cache_chunks(len(images))
    mine = [c for c in range(proc.rank, len(chunks), proc.world) if not os.path.exists(cache_file(folder, "tokens", c))]
    batches = [(c, list(chunks[c][i:i + CACHE_BATCH])) for c in mine for i in range(0, len(chunks[c]), CACHE_BATCH)]
    loader = DataLoader(dataset, batch_sampler=[b for _, b in batches], num_workers=workers)
    tokens, embeddings = [], []
    for (chunk, batch), x in zip(batches, loader):
        if stop.signal is not None:
            print(f"stopped by signal {stop.signal} while encoding images for stage 2; finished cache chunks are "
                  f"kept in {folder}, and the next run encodes only the rest")
            sys.exit(128 + stop.signal)
        x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1).to(proc.device)  # (b, 3, S, S) -> (2b, ...), interleaved
        tokens.append(vq.encode(x).flatten(1).cpu().numpy().astype(token_dtype))  # (2b, h*w)
        clip_in = clip_loader.preprocess_tensor(x, clip_model.arch.image_resolution)
        embeddings.append(clip_model.encode_image(clip_in).float().cpu().numpy().astype(np.float16))  # (2b, clip_dim)
        if batch[-1] == chunks[chunk][-1]:  # the chunk is complete
            data.save_npy(np.concatenate(embeddings), cache_file(folder, "embeddings", chunk))
            data.save_npy(np.concatenate(tokens), cache_file(folder, "tokens", chunk))  # last: marks it done
            tokens, embeddings = [], []


def lr_at(step, args):
    """Linear warm-up to --prior-lr, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.prior_lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.prior_steps - args.warmup)
    return args.prior_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def step_randomness(args, step, rows, cfg, proc):
    """This process's rows' random draws at `step`, cut from the global batch's draws made with a (seed,
    step) generator: the same numbers whatever the number of processes, and reproducible after a resume.
    -> {"drop": (rows,) condition dropout, "noise": (rows, clip_dim) pseudo-text noise}, and for the diffusion
    prior the forward process's draws: "t" (rows,) steps in 1..T, "uniform" and "codes" (rows, n_tokens)."""
    g = torch.Generator().manual_seed(data.stable_seed(args.seed, "prior", step))
    n = rows * proc.world
    draws = {"drop": torch.rand(n, generator=g) < args.cond_drop, "noise": torch.randn(n, cfg.clip_dim, generator=g)}
    if args.prior == "diffusion":
        draws["t"] = torch.randint(1, cfg.n_steps + 1, (n,), generator=g)
        draws["uniform"] = torch.rand(n, cfg.n_tokens, generator=g)
        draws["codes"] = torch.randint(cfg.vocab_size, (n, cfg.n_tokens), generator=g)
    return {k: v[proc.rank * rows:(proc.rank + 1) * rows] for k, v in draws.items()}


def prior_step(model, raw_model, opt, micro_batches, embed_rows, vq, clip_model, args, autocast):
    """One prior update over micro-batches of (tokens (b, n_tokens), embeddings (b, clip_dim), draws: a dict
    of step_randomness's (b, ...) tensors), with the prior's loss: prior.clipgen_loss for the GPT, whose
    embedding-reconstruction loss, when embed_rows > 0, uses the first micro-batch's first embed_rows images;
    diffusion.diffusion_loss for the diffusion prior. Returns scalars to log: the loss and its two terms
    (ce and embed, or vlb and aux), each a mean over micro-batches (embed: the first micro-batch's)."""
    n = len(micro_batches)
    opt.zero_grad(set_to_none=True)
    logs = {}
    for i, (tokens, embeddings, draws) in enumerate(micro_batches):
        condition = prior.pseudo_text_embedding(embeddings, args.pseudo_text_alpha, draws["noise"])
        with sync_gradients(model, i == n - 1):
            with autocast:
                if args.prior == "diffusion":
                    x_t = raw_model.schedule.corrupt(tokens, draws["t"], draws["uniform"], draws["codes"])
                    logits = model(condition, x_t, draws["t"], draws["drop"])  # (b, n_tokens, vocab)
                    loss, *terms = diffusion.diffusion_loss(logits, tokens, x_t, draws["t"], raw_model.schedule,
                                                            args.aux_loss_weight)
                    names = ("vlb", "aux")
                else:
                    logits = model(condition, tokens[:, :-1], draws["drop"])  # (b, n_tokens, vocab)
                    loss, *terms = prior.clipgen_loss(logits, tokens, embeddings, draws["drop"],
                                                      args.embed_loss_weight, embed_rows if i == 0 else 0, vq,
                                                      clip_model, args.gumbel_tau, args.gumbel_hard)
                    names = ("ce", "embed")
            (loss / n).backward()
        for name, value in zip(("loss", *names), (loss, *terms)):
            if name == "embed":  # computed on the first micro-batch alone
                logs.setdefault(name, value.detach())
            else:
                logs[name] = logs.get(name, 0) + value.detach() / n
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
    opt.step()
    return logs


def train_prior(args, images, fingerprint, proc):
    cuda = proc.device.type == "cuda"
    torch.manual_seed(args.seed + proc.rank)
    vqgan_path = os.path.join(args.out, "vqgan.pt")
    if not os.path.exists(vqgan_path):
        fail(f"no VQGAN checkpoint at {vqgan_path}. Train stage 1 first "
             f"(python train.py --data {args.data} --out {args.out} --stage vqgan) or use --stage all")
    try:  # frozen: stage 2 only reads them
        vq = vqgan.load_vqgan(vqgan_path, proc.device)[0].requires_grad_(False)
        clip_model = clip_loader.load(args.clip, device=proc.device)[0].requires_grad_(False)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(e)
    # The token grid is the VQGAN's: its image size decides it, whatever the preset says.
    if args.image_size not in (None, vq.cfg.image_size):
        fail(f"--image-size {args.image_size} but {vqgan_path} was trained at {vq.cfg.image_size} px; stage 2 "
             f"encodes images at the VQGAN's size, so drop --image-size for --stage prior")

    # The cache: every image's tokens and embedding, encoded once (split over the processes) and then
    # memory-mapped by all of them, so the prior's steps never touch image files, and the frozen models run
    # only for the embedding loss and grids. vqgan.pt is hashed once here: the cache key and every
    # checkpoint name this exact VQGAN.
    vqgan_sha256 = data.sha256_of(vqgan_path)
    stop = GracefulStop()  # from here on: a signal during the cache build must not wait for the whole build
    folder = os.path.join(args.out, "prior_cache_" + cache_key(fingerprint, vqgan_sha256, args.clip, vq.cfg.image_size)[:16])
    n_chunks = len(cache_chunks(len(images)))
    missing = sum(not os.path.exists(cache_file(folder, "tokens", c)) for c in range(n_chunks))
    if proc.master and missing:
        print(f"encoding {len(images)} images (and their mirror images) with the VQGAN and CLIP in {proc.world} "
              f"process(es): {missing} of {n_chunks} cache chunks to write in {folder}")
    elif proc.master:
        print(f"using cached tokens and embeddings in {folder}")
    build_cache(images, vq, clip_model, folder, proc, stop, args.workers)
    if dist.is_initialized():
        dist.barrier()  # each process waits only for the others' share of the chunks
    tokens = data.ChunkedArray([cache_file(folder, "tokens", c) for c in range(n_chunks)])
    embeddings = data.ChunkedArray([cache_file(folder, "embeddings", c) for c in range(n_chunks)])

    # Hold out a few images (both flips) for the sample grids: they show generalisation, not memory.
    n_holdout = min(HOLDOUT_IMAGES, len(images) // 5)
    preview_ids = range(len(images) - n_holdout, len(images)) if n_holdout else range(min(HOLDOUT_IMAGES, len(images)))
    preview = torch.stack([data.ImageFolder(images, vq.cfg.image_size)[i] for i in preview_ids])
    preview_emb = read_rows(embeddings, [2 * i for i in preview_ids])
    n_train = 2 * (len(images) - n_holdout)  # rows 0..n_train-1 of the cache
    per_rank = args.batch_size * args.grad_accum
    if n_train < per_rank * proc.world:
        fail(f"{n_train} training sequences are fewer than one global batch ({per_rank * proc.world}); "
             f"lower --batch-size or --grad-accum")

    # The prior's vocabulary, sequence length and condition size are read off the VQGAN and CLIP actually used.
    sizes = dict(vocab_size=vq.cfg.codebook_size, n_tokens=tokens.shape[1], clip_dim=embeddings.shape[1],
                 remove_mean=args.remove_mean)
    if args.prior == "diffusion":
        cfg = replace(diffusion.PRESETS[args.preset], **sizes)
    else:
        cfg = replace(prior.PRESETS[args.preset], adaln=args.adaln, **sizes)
    ckpt, ckpt_path = latest_checkpoint(args, "prior", proc)
    if ckpt is not None:
        if ckpt["vqgan_sha256"] != vqgan_sha256:
            fail(f"{vqgan_path} is not the VQGAN {ckpt_path} was trained with; resuming would pair the prior "
                 f"with other tokens. Train the prior into a new --out")
        refuse_changed_run(ckpt, ckpt_path, asdict(cfg), args, per_rank * proc.world)
        cfg = type(cfg)(**ckpt["config"])
    start = ckpt["step"] if ckpt is not None else 0
    if start >= args.prior_steps:
        return
    raw_model = (diffusion.DiffusionPrior if args.prior == "diffusion" else prior.Prior)(cfg).to(proc.device)
    raw_model.embedding_mean.copy_(mean_direction(embeddings, n_train))  # used only with --remove-mean
    # Weight decay on matrices only; biases, norms and vectors are left alone (as in nanoGPT).
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.prior_lr, betas=(0.9, 0.95),
                            fused=cuda)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    model = wrap_model(raw_model, args, proc)
    if proc.master:
        kind = f"diffusion prior, {cfg.n_steps} steps, adaLN" if args.prior == "diffusion" else \
            f"GPT prior, {'prefix + adaLN' if cfg.adaln else 'prefix'}"
        print(f"{kind} conditioning: {millions(raw_model)}M params ({cfg.n_layer} layers, width {cfg.n_embd}) | "
              f"{n_train} training sequences of "
              f"{cfg.n_tokens} tokens, {n_holdout} images held out | CLIP {args.clip} ({cfg.clip_dim}-d) | "
              f"global batch {per_rank * proc.world} = {per_rank * proc.world * cfg.n_tokens} tokens/step | "
              f"lr {args.prior_lr} | device {proc.device} x{proc.world}")
        if ckpt is not None:
            print(f"resuming stage 2 from {ckpt_path} at step {start}")

    # The random state is restored last; with it the embedding loss last computed, which progress lines show.
    embed_loss = torch.zeros((), device=proc.device)
    if ckpt is not None:
        embed_loss.fill_(restore_process_state(ckpt["rng"], proc).get("embed", 0.0))
    guard, meter = NonFiniteGuard(proc.device, last_good=ckpt_path), Meter(start)
    step = start
    while step < args.prior_steps:
        # The schedule is a function of the step, so a resume needs no scheduler state.
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        # This rank's rows of the cache and its share of the step's random draws; both are functions of the
        # step alone (see data.batch_indices and step_randomness), like stage 1's images.
        rows, _ = data.batch_indices(n_train, per_rank, proc.rank, proc.world, args.seed, step)
        draws = step_randomness(args, step, per_rank, cfg, proc)
        micro = [(read_rows(tokens, rows[j:j + args.batch_size]).to(proc.device, non_blocking=True),
                  read_rows(embeddings, rows[j:j + args.batch_size]).to(proc.device, non_blocking=True),
                  {k: v[j:j + args.batch_size].to(proc.device) for k, v in draws.items()})
                 for j in range(0, per_rank, args.batch_size)]
        # The embedding loss costs several GPT steps (a VQGAN decode and a CLIP forward with their backward);
        # every few steps on a few images keeps its signal at a fraction of the cost.
        with_embed = args.embed_loss_weight > 0 and step % args.embed_loss_every == 0
        logs = prior_step(model, raw_model, opt, micro, args.embed_loss_batch if with_embed else 0, vq, clip_model,
                          args, proc.autocast())
        guard.update(logs["loss"], step)
        embed_loss = logs["embed"] if with_embed else embed_loss
        step += 1

        if step % args.log_every == 0 or step == args.prior_steps:
            guard.check()
            terms = {"vlb": logs["vlb"], "aux": logs["aux"]} if args.prior == "diffusion" else \
                {"ce": logs["ce"], "embed": embed_loss}
            shown = mean_over_ranks(terms, proc.device)
            if proc.master:
                print(f"step {step:>6}/{args.prior_steps} | {' '.join(f'{k} {v:.4f}' for k, v in shown.items())} | "
                      f"lr {lr_at(step - 1, args):.2e} | {meter.rate(step, per_rank * proc.world * cfg.n_tokens):,.0f} "
                      f"tokens/s | eta {meter.eta(step, args.prior_steps)}", flush=True)
        stopping = stop.requested(step, proc.device)
        if step % args.save_every == 0 or step == args.prior_steps or stopping:
            guard.check()
            ckpt = {"kind": "prior", "prior_type": args.prior, "config": asdict(cfg), "model": raw_model.state_dict(),
                    "optimizer": opt.state_dict(), "step": step, "global_batch": per_rank * proc.world,
                    "rng": gather_process_states(proc, embed=embed_loss.item()), "clip": args.clip,
                    "vqgan": os.path.abspath(vqgan_path), "vqgan_sha256": vqgan_sha256, "args": vars(args)}
            guard.last_good = save_rotating(ckpt, args, "prior", step, proc)
            if proc.master:
                save_prior_grid(raw_model, vq, preview, preview_emb, os.path.join(args.out, f"prior_{step:07d}.png"),
                                args.seed, proc)
        if stopping:
            stop.exit(step, proc)
    if proc.master:
        print(f"stage 2 done: {os.path.join(args.out, 'prior.pt')}")


def mean_direction(embeddings, n_rows):
    """The mean of the first n_rows unit-normalised embeddings (a ChunkedArray), one chunk file at a time."""
    total = 0
    for start, part in zip(embeddings.starts, embeddings.parts):
        total = total + F.normalize(torch.from_numpy(part[:max(0, n_rows - start)].astype(np.float32)), dim=-1).sum(0)
    return total / n_rows


@torch.no_grad()
def save_prior_grid(model, vq, preview, preview_emb, path, seed, proc):
    """Held-out images over the prior's samples from their CLIP image embeddings: stage 2's visual log."""
    model.eval()
    with proc.autocast():
        samples = model.sample(preview_emb.to(proc.device), temperature=1.0, top_k=100,
                               generator=torch.Generator(proc.device).manual_seed(seed))
        side = math.isqrt(model.cfg.n_tokens)
        images = vq.decode(samples.view(-1, side, side)).float().clamp(-1, 1).cpu()
    model.train()
    save_grid(preview, images, path)


# -----------------------------------------------------------------------------------------------------------
# main: both stages in one process group. Under torchrun every process runs this, and they meet in the
# collective calls (gradient all-reduce, logging, checkpoints, barriers).


def main(argv=None):
    args = parse_args(argv)
    proc = setup_distributed(args.device)
    try:
        images, fingerprint = scan_data(args, proc)
        if args.stage in ("vqgan", "all"):
            train_vqgan(args, images, proc)
            if dist.is_initialized():
                dist.barrier()  # stage 2 on other ranks reads the vqgan.pt that rank 0 has just written
        if args.stage in ("prior", "all"):
            train_prior(args, images, fingerprint, proc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def scan_data(args, proc):
    """-> (ImageRefs of --data, a fingerprint of its sources). Rank 0 lists the sources (files and shards)
    with their sizes and modification times; those that OUT/manifest.json does not already describe are
    checked, split over all processes; rank 0 writes the updated manifest. A second run, or a resumed one,
    so re-checks only what changed, and no process checks more than its share."""
    manifest_path = os.path.join(args.out, "manifest.json")
    listing = None
    if proc.master:
        try:
            listing = data.stat_sources(data.find_sources(args.data))
        except ValueError as e:
            listing = str(e)
    listing = broadcast_object(listing, proc)
    if isinstance(listing, str):
        fail(listing)
    known = data.read_manifest(manifest_path)
    todo = [s for s in listing if s[0] not in known or known[s[0]]["source"] != s]
    mine = [data.scan_source(s) for s in todo[proc.rank::proc.world]]
    scanned = {e["source"][0]: e for part in gather_objects(mine, proc) for e in part}
    entries = [scanned[s[0]] if s[0] in scanned else known[s[0]] for s in listing]
    if proc.master and (todo or len(known) != len(listing)):
        os.makedirs(args.out, exist_ok=True)
        data.write_manifest(manifest_path, entries)
    try:
        images, bad = data.images_of(entries)
    except ValueError as e:
        fail(f"--data {args.data!r}: {e}")
    if bad and proc.master:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"warning: skipping {len(bad)} unreadable image file(s): {shown}", file=sys.stderr)
    return images, hashlib.sha256(json.dumps(listing).encode()).hexdigest()


# ===========================================================================================================
# Plumbing shared by both stages: processes and devices, checkpoints, random states, signals, the NaN guard.


def fail(message):
    """A run that can not proceed: one line on stderr, exit status 1 (2 is for a bad command line)."""
    sys.exit(f"error: {message}")


def millions(model):
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"


@dataclass
class Process:
    """This process: its rank among `world` processes (torchrun sets RANK and WORLD_SIZE) and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0  # the one process that prints and writes files

    def autocast(self):
        """bf16 autocast on CUDA (matmuls and convolutions in bf16, reductions in fp32); plain fp32 on a CPU."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")


def setup_distributed(device_arg):
    """-> Process. NCCL between GPUs, gloo between CPU processes."""
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device_arg} but no CUDA device is available; use --device cpu")
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    index = int(device_arg.split(":")[1]) if ":" in device_arg else int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{index}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        # TF32 matmuls/convolutions: ~2x faster fp32 math on Ampere and later, at bf16-like mantissa.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Process(rank, world, device)


def wrap_model(model, args, proc):
    """Optionally compile, then wrap in DDP. The caller keeps the plain module for saving."""
    if args.compile:
        model = torch.compile(model)
    if proc.world > 1:
        model = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    return model


def sync_gradients(model, last_micro_step):
    """DDP averages gradients over processes in every backward; with gradient accumulation only the last
    micro-step's backward needs to, so the others run under no_sync (entered before their forward)."""
    return model.no_sync() if isinstance(model, DDP) and not last_micro_step else nullcontext()


def broadcast_object(obj, proc):
    """Rank 0's `obj` on every process (pickled; for set-up data, not tensors)."""
    if proc.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, proc):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if proc.world == 1:
        return [obj]
    out = [None] * proc.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values, device):
    """Average a dict of floats/scalar tensors over all processes (only called on logging steps)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


class Meter:
    """Throughput since the last call and the time left, for progress lines."""

    def __init__(self, start):
        self.t0 = self.last = time.time()
        self.start = self.last_step = start

    def rate(self, step, units_per_step):
        now = time.time()
        rate = (step - self.last_step) * units_per_step / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate

    def eta(self, step, total):
        seconds = (time.time() - self.t0) / max(step - self.start, 1) * (total - step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))


def save_grid(top, bottom, path):
    """Two rows of images in [-1, 1], (n, 3, H, W) each, as one PNG."""
    save_image(torch.cat([top, bottom]) * 0.5 + 0.5, path, nrow=len(top))


# ----- checkpoints: atomic writes, the last K kept, everything needed to continue exactly

def save_rotating(obj, args, kind, step, proc):
    """Write OUT/checkpoints/KIND_STEP.pt (rank 0), point OUT/KIND.pt (what sample.py loads) at it with an
    atomic hard link, and delete all but the newest --keep-checkpoints step files. Returns OUT/KIND.pt."""
    latest = os.path.join(args.out, f"{kind}.pt")
    if not proc.master:
        return latest
    folder = os.path.join(args.out, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{kind}_{step:07d}.pt")
    data.save_checkpoint(obj, path)
    tmp = os.path.join(args.out, f".{kind}.pt.link")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: a second copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    for old in sorted(f for f in os.listdir(folder) if f.startswith(kind + "_"))[:-args.keep_checkpoints]:
        os.remove(os.path.join(folder, old))
    return latest


def latest_checkpoint(args, kind, proc):
    """With --resume: the newest readable checkpoint of `kind` in --out and its path, else (None, None).
    A truncated or corrupt newest file (a crash, a full disk) falls back to the previous one, with a warning."""
    if not args.resume:
        return None, None
    folder = os.path.join(args.out, "checkpoints")
    history = sorted((f for f in os.listdir(folder) if f.startswith(kind + "_")), reverse=True) \
        if os.path.isdir(folder) else []
    candidates = [p for p in [os.path.join(args.out, f"{kind}.pt")] + [os.path.join(folder, f) for f in history]
                  if os.path.exists(p)]
    for path in candidates:
        try:
            return data.load_checkpoint(path, kind), path
        except ValueError as e:
            if proc.master:
                print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
    if candidates:  # training from step 0 would overwrite them: leave them for the user to inspect
        fail(f"--resume: none of the {len(candidates)} {kind} checkpoint(s) in {args.out} could be read; move "
             f"them away to train {kind} from scratch")
    if proc.master:
        print(f"--resume: no {kind} checkpoint in {args.out} yet; training {kind} from step 0")
    return None, None


# Config fields that a flag other than --preset decides.
FLAG_OF_FIELD = {"image_size": "--image-size", "adaln": "--adaln", "clip_dim": "--clip", "remove_mean": "--remove-mean"}


def refuse_changed_run(ckpt, ckpt_path, config, args, global_batch):
    """Exit, naming the flag, if resuming with these flags would build another model than the checkpoint's
    or feed the data in another order (seed, global batch); anything else may change on resume."""
    saved = ckpt["args"]
    saved_prior = saved.get("prior", "ar")  # runs from before --prior existed trained the GPT
    if saved_prior != args.prior:
        fail(f"--prior {args.prior} but {ckpt_path} holds a --prior {saved_prior} run; resume with "
             f"--prior {saved_prior}, or train the other prior into another --out")
    if saved["preset"] != args.preset:
        fail(f"--preset {args.preset} but {ckpt_path} was trained with --preset {saved['preset']}; resume with "
             f"the same preset, or start a new run in another --out")
    for field, value in ckpt["config"].items():
        if json.dumps(value) != json.dumps(config[field]):  # tuples come back as tuples or lists
            flag = FLAG_OF_FIELD.get(field, "--preset")
            fail(f"{flag} gives {field} = {config[field]} but {ckpt_path} was trained with {value}; resume with "
                 f"the flags it was trained with, or start a new run in another --out")
    if saved["seed"] != args.seed:
        fail(f"--seed {args.seed} but {ckpt_path} was trained with --seed {saved['seed']}, which decides the "
             f"data order; resume with --seed {saved['seed']}")
    if ckpt["global_batch"] != global_batch:
        fail(f"--batch-size x --grad-accum x processes = {global_batch}, but {ckpt_path} was trained with a "
             f"global batch of {ckpt['global_batch']}, which decides the data order; keep that product")


# ----- random states

def gather_process_states(proc, **extra):
    """Every process's torch (and CUDA) random state plus `extra` values, gathered so rank 0 can save them."""
    state = {"torch": torch.get_rng_state(), **extra}
    if proc.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(proc.device)
    if not dist.is_initialized():
        return [state]
    states = [None] * proc.world
    dist.all_gather_object(states, state)
    return states


def restore_process_state(states, proc):
    """Restore this process's random state from a checkpoint; returns its saved dict (with any extras)."""
    if len(states) != proc.world:
        print("warning: the checkpoint was written with another number of processes; random streams restart",
              file=sys.stderr)
        return {}
    torch.set_rng_state(states[proc.rank]["torch"])
    if proc.device.type == "cuda" and "cuda" in states[proc.rank]:
        torch.cuda.set_rng_state(states[proc.rank]["cuda"], proc.device)
    return states[proc.rank]


# ----- signals and non-finite losses

class GracefulStop:
    """SIGTERM (a scheduler pre-empting the job) or Ctrl-C sets a flag; the loop finishes its step, saves
    a checkpoint and exits. Under DDP all ranks must agree on the step at which they stop, so the flag is
    OR-reduced over ranks every `every` steps (a device round trip we do not want on every step)."""

    def __init__(self, every=10):
        self.signal, self.every = None, every
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def requested(self, step, device):
        if not dist.is_initialized():
            return self.signal is not None
        if step % self.every:
            return False
        flag = torch.tensor(float(self.signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal is None:
            self.signal = signal.SIGTERM
        return bool(flag.item())

    def exit(self, step, proc):
        if proc.master:
            print(f"stopped by signal {self.signal} after step {step}; checkpoint saved, continue with --resume")
        sys.exit(128 + self.signal)


class NonFiniteGuard:
    """Remembers, on the device and without waiting for it, the first step whose loss was NaN or inf;
    `check` (called before logging and saving) stops the run naming that step, so no checkpoint is ever
    written from a diverged model."""

    NONE = 1 << 62  # "no bad step": larger than any step, so a MIN over ranks finds the first bad one

    def __init__(self, device, last_good=None):
        self.first_bad = torch.full((), self.NONE, dtype=torch.long, device=device)
        self.last_good = last_good  # path of the newest checkpoint written from finite losses

    def update(self, loss, step):
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad == self.NONE)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self):
        first_bad = self.first_bad.clone()
        if dist.is_initialized():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        if first_bad.item() != self.NONE:
            fail(f"the loss became NaN/inf at step {first_bad.item()}; stopping without saving. The last good "
                 f"checkpoint is {self.last_good or 'none (no checkpoint yet)'}: resume from it with --resume "
                 f"and a lower learning rate.")


if __name__ == "__main__":
    main()
