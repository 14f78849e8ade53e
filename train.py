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
import functools
import hashlib
import json
import math
import os
import shutil
import signal
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
from torch.utils.data import DataLoader, Dataset, Sampler
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
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; global batch = batch size x this x processes")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly where the run in --out stopped (weights, optimizers, step, data "
                        "position, random state)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="step checkpoints kept in OUT/checkpoints")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (faster on GPU after a warm-up)")
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
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps, then cosine decay to 10%% (default: 1000, or a tenth of "
                        "--prior-steps if that is less)")
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
    if args.warmup is None:
        args.warmup = min(1000, max(1, args.prior_steps // 10))
    if args.image_size is None:
        args.image_size = vqgan.PRESETS[args.preset].image_size
    downsample = vqgan.PRESETS[args.preset].downsample
    if args.image_size % downsample:
        p.error(f"--image-size must be a multiple of {downsample} for preset {args.preset!r}")
    for name in ("batch_size", "grad_accum", "keep_checkpoints", "vqgan_steps", "prior_steps", "log_every", "save_every", "embed_loss_every",
                 "embed_loss_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# -----------------------------------------------------------------------------------------------------------
# Data: every image under a folder, any mode converted to RGB, resized and cropped to a square.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# A run should never die hours in because of one bad file, nor silently train on fewer images than the user
# thinks: bad files are dropped up front and named once, and a file that only fails later is replaced.


def find_images(folder):
    """Sorted paths of all images under `folder` (recursively); exits with a message if there are none."""
    if not os.path.isdir(folder):
        sys.exit(f"error: --data {folder!r} is not a folder")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder, followlinks=True)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        sys.exit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder!r}")
    return paths


def readable_images(paths, report=True):
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
    if bad and report:
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

def stable_seed(*parts):
    """A 63-bit seed from integers, the same in every process and Python session (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class ImageFolder(Dataset):
    """Square crops of images as (3, S, S) tensors in [-1, 1].

    Indexed with an int: a center crop (evaluation, caches, grids). Indexed with (i, epoch): a random crop
    and flip drawn from a generator seeded by (seed, epoch, i), so an image's augmentation does not depend
    on which process or worker loads it. That is what makes 2 processes equal 1, and a resumed run equal
    an uninterrupted one."""

    def __init__(self, paths, image_size, seed=0):
        self.paths, self.size, self.seed = paths, image_size, seed
        self.resize = transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.paths)):  # a file that passed the header check but will not decode
            path = self.paths[(i + attempt) % len(self.paths)]
            try:
                image = self.resize(open_rgb(path))  # shorter side = size
                break
            except Exception as e:
                warnings.warn(f"skipping {path}: {e}")
        else:
            raise RuntimeError("no image could be decoded")
        W, H = image.size
        if epoch is None:
            left, top, flip = (W - self.size) // 2, (H - self.size) // 2, False
        else:
            g = torch.Generator().manual_seed(stable_seed(self.seed, epoch, i))
            left, top = (int(torch.randint(d - self.size + 1, (), generator=g)) for d in (W, H))
            flip = bool(torch.randint(2, (), generator=g))
        x = self.to_tensor(image.crop((left, top, left + self.size, top + self.size)))  # (3, S, S)
        return x.flip(-1) if flip else x


@functools.lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, epoch)))


def batch_indices(n, per_rank, rank, world, seed, step):
    """This process's item indices for optimizer step `step` (0-based), and the epoch.

    Every epoch is a fresh permutation of the n items, seeded by (seed, epoch), cut into global batches of
    per_rank * world items (the remainder is dropped, so no item is seen twice in an epoch); rank r takes
    the r-th contiguous chunk of each. So the data of step s is a function of s alone: 2 processes with
    batch b see exactly what 1 process with batch 2b sees, and resuming at step s needs only s."""
    per_step = per_rank * world
    epoch, k = divmod(step, n // per_step)
    start = k * per_step + rank * per_rank
    return epoch_permutation(n, seed, epoch)[start:start + per_rank].tolist(), epoch


class StepSampler(Sampler):
    """Feeds a DataLoader the (index, epoch) pairs of batch_indices, from `start_step` on, forever."""

    def __init__(self, n, per_rank, rank, world, seed, start_step):
        self.args, self.start_step = (n, per_rank, rank, world, seed), start_step

    def __iter__(self):
        step = self.start_step
        while True:
            indices, epoch = batch_indices(*self.args, step)
            yield from ((i, epoch) for i in indices)
            step += 1


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
        # TF32 matmuls/convolutions: ~2x faster fp32 math on Ampere and later, at bf16-like mantissa.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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


def sync_gradients(model, last_micro_step):
    """DDP averages gradients over processes in every backward; with gradient accumulation only the last
    micro-step's backward needs to, so the others run under no_sync (entered before their forward)."""
    return model.no_sync() if isinstance(model, DDP) and not last_micro_step else nullcontext()


def save_grid(top, bottom, path):
    """Two rows of images in [-1, 1], (n, 3, H, W) each, as one PNG: the training runs' visual log."""
    save_image(torch.cat([top, bottom]) * 0.5 + 0.5, path, nrow=len(top))


def format_eta(seconds):
    return "?" if not math.isfinite(seconds) else time.strftime("%H:%M:%S", time.gmtime(seconds))


def wrap_model(model, args, device, world):
    """Optionally compile, then wrap in DDP. The caller keeps the plain module for saving."""
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, the last K kept, everything needed to continue exactly, and graceful stops.


def save_checkpoint(obj, path):
    """torch.save to a temp file in the same folder, then an atomic rename: a crash mid-write never
    leaves a truncated checkpoint where a good one was."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_rotating(obj, out, kind, step, keep):
    """Write OUT/checkpoints/KIND_STEP.pt, point OUT/KIND.pt (what sample.py loads) at it with an atomic
    hard link, and delete all but the newest `keep` step files."""
    folder = os.path.join(out, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{kind}_{step:07d}.pt")
    save_checkpoint(obj, path)
    latest, tmp = os.path.join(out, f"{kind}.pt"), os.path.join(out, f".{kind}.pt.link")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: a second copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    for old in sorted(f for f in os.listdir(folder) if f.startswith(kind + "_"))[:-keep]:
        os.remove(os.path.join(folder, old))


def load_latest(out, kind):
    """The newest readable checkpoint of `kind` in `out`, or None. A truncated or corrupt newest file (a
    crash, a full disk) makes it fall back to the previous one, with a warning."""
    folder = os.path.join(out, "checkpoints")
    history = sorted((f for f in os.listdir(folder) if f.startswith(kind + "_")), reverse=True) \
        if os.path.isdir(folder) else []
    candidates = [os.path.join(out, f"{kind}.pt")] + [os.path.join(folder, f) for f in history]
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            return vqgan.load_checkpoint(path, kind), path
        except ValueError as e:
            print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
    return None, None


def rng_states(device):
    """Every process's torch (and CUDA) random state, gathered so rank 0 can save them all."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states, rank, device):
    if len(states) != (dist.get_world_size() if dist.is_initialized() else 1):
        print("warning: the checkpoint was written with another number of processes; random streams restart",
              file=sys.stderr)
        return
    torch.set_rng_state(states[rank]["torch"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


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


class NonFiniteGuard:
    """Remembers, on the device and without waiting for it, the first step whose loss was NaN or inf;
    `check` (called before logging and saving) stops the run naming that step, so no checkpoint is ever
    written from a diverged model."""

    def __init__(self, device, last_good=None):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.last_good = last_good  # path of the newest checkpoint written from finite losses

    def update(self, loss, step):
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self):
        first_bad = self.first_bad.clone()
        if dist.is_initialized():
            first_bad[first_bad < 0] = 1 << 62
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            first_bad[first_bad == 1 << 62] = -1
        if first_bad.item() >= 0:
            sys.exit(f"error: the loss became NaN/inf at step {first_bad.item()}; stopping without saving. "
                     f"The last good checkpoint is {self.last_good or 'none (no checkpoint yet)'}: resume from it "
                     f"with --resume and a lower learning rate.")


def save_or_stop(step, total, args, kind, stop, guard, checkpoint, master):
    """The end of every training step of both stages: save every --save-every steps, at the last step, and
    when a signal asked to stop, in which case exit after saving. Never saves after a NaN/inf loss."""
    stopping = stop.requested(step, guard.first_bad.device)
    if step % args.save_every == 0 or step == total or stopping:
        guard.check()
        checkpoint(step)
        guard.last_good = os.path.join(args.out, f"{kind}.pt")
    if stopping:
        if master:
            print(f"stopped by signal {stop.signal} after step {step}; checkpoint saved, continue with --resume")
        sys.exit(128 + stop.signal)


# -----------------------------------------------------------------------------------------------------------
# Stage 1: the VQGAN (vqgan.py).


def generator_step(model, raw_model, raw_disc, perceptual, opt_g, micro_batches, gan_on, autocast,
                   check_dead_codes=True):
    """One VQGAN update over a list of micro-batches (gradient accumulation): L1 (+ perceptual)
    reconstruction + codebook losses, plus the adaptively weighted adversarial loss once `gan_on`.
    The discriminator is called unwrapped and frozen, so this step can never change it.
    Returns the detached reconstructions and a dict of scalar tensors (means over micro-batches) to log."""
    cfg, n = raw_model.cfg, len(micro_batches)
    raw_disc.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    recons, logs = [], {}
    for i, images in enumerate(micro_batches):
        with sync_gradients(model, i == n - 1):
            with autocast:
                recon, ids, codebook_loss = model(images)
                rec_loss = (recon.float() - images).abs().mean()
                if perceptual is not None:
                    rec_loss = rec_loss + cfg.perceptual_weight * perceptual(recon.float(), images)
                gan_loss = -raw_disc(recon).float().mean() if gan_on else torch.zeros((), device=images.device)
            gan_weight = torch.zeros((), device=images.device)
            if gan_on:
                gan_weight = cfg.gan_weight * vqgan.adaptive_gan_weight(rec_loss, gan_loss,
                                                                         raw_model.decoder.conv_out.weight)
            loss = rec_loss + gan_weight * gan_loss + codebook_loss
            (loss / n).backward()
        recons.append(recon.detach())
        step_logs = {"loss": loss, "rec": rec_loss, "codebook": codebook_loss, "gan": gan_loss,
                     "gan_weight": gan_weight, "psnr": vqgan.psnr(recon.detach(), images),
                     "ppl": vqgan.codebook_perplexity(ids, cfg.codebook_size)}
        for k, v in step_logs.items():
            logs[k] = logs.get(k, 0) + v.detach() / n
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
                d_loss = vqgan.hinge_d_loss(disc(images).float(), disc(recon.detach()).float())
            (d_loss / len(recons)).backward()
        total = total + d_loss.detach() / len(recons)
    opt_d.step()
    return total


def train_vqgan(args, paths, rank, world, device):
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    cfg = vqgan.PRESETS[args.preset]
    cfg = vqgan.VQGANConfig(**{**asdict(cfg), "image_size": args.image_size})
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    # channels_last (NHWC) lets cuDNN use tensor-core convolution kernels without layout transposes.
    memory_format = torch.channels_last if cuda else torch.contiguous_format

    # Models and optimizers (Adam with beta1 = 0.5, as taming: GAN training is unstable with more momentum)
    model = vqgan.VQGAN(cfg).to(device, memory_format=memory_format)
    raw_disc = vqgan.PatchDiscriminator(cfg).to(device, memory_format=memory_format)
    perceptual = vqgan.PerceptualLoss().to(device, memory_format=memory_format) if args.perceptual == "vgg" else None
    opt_g = torch.optim.Adam(model.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9), fused=cuda)
    opt_d = torch.optim.Adam(raw_disc.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9), fused=cuda)
    # Resume: weights and optimizer moments now; the random state only just before the loop (see there).
    start, ckpt, ckpt_path = 0, None, None
    if args.resume:
        ckpt, ckpt_path = load_latest(args.out, "vqgan")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        raw_disc.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        start = ckpt["step"]
        if master:
            print(f"resuming stage 1 from {ckpt_path} at step {start}")
    if start >= args.vqgan_steps:  # `--stage all --resume` after stage 1 had finished
        return
    raw_model = model
    if args.compile:
        # The adaptive GAN weight differentiates twice through the same graph (retain_graph=True), which
        # compiled backward passes that reuse ("donate") their saved buffers forbid; keep them.
        torch._functorch.config.donated_buffer = False
    model, disc = wrap_model(model, args, device, world), wrap_model(raw_disc, args, device, world)

    # Data: this process's share of each step's images, from step `start` on, loaded by worker processes.
    per_rank = args.batch_size * args.grad_accum
    if len(paths) < per_rank * world:
        sys.exit(f"error: {len(paths)} images are fewer than one global batch ({per_rank * world}); "
                 f"lower --batch-size or --grad-accum")
    # Workers decode and augment in parallel with the GPU step; pinned host memory lets the copy to the GPU
    # run asynchronously (non_blocking below). The sampler starts at `start`, so a resumed run continues
    # with exactly the images the interrupted one would have seen next.
    dataset = ImageFolder(paths, args.image_size, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=cuda,
                        sampler=StepSampler(len(paths), per_rank, rank, world, args.seed, start),
                        persistent_workers=args.workers > 0)
    batches = iter(loader)  # before the RNG restore below: creating the iterator draws a random seed
    # A fixed batch of center crops of the first images for the reconstruction grids.
    preview = torch.stack([dataset[i] for i in range(min(8, len(paths)))])
    if master:
        n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
        side = args.image_size // cfg.downsample
        print(f"VQGAN {n_params(raw_model):.1f}M params, discriminator {n_params(raw_disc):.2f}M | {len(paths)} images, "
              f"{args.image_size}px -> {side}x{side} tokens, codebook {cfg.codebook_size} | device {device} x{world} "
              f"{'bf16 autocast' if cuda else 'float32'} | global batch {per_rank * world} "
              f"({args.batch_size} x {args.grad_accum} accumulation x {world} processes)")

    def checkpoint(step):
        # Every rank takes part (rng_states gathers each rank's random state); only rank 0 writes.
        # Weights come from the unwrapped, uncompiled modules so the file loads into a plain VQGAN.
        obj = {"kind": "vqgan", "config": asdict(cfg), "model": raw_model.state_dict(),
               "discriminator": raw_disc.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
               "step": step, "rng": rng_states(device), "args": vars(args)}
        if not master:
            return
        save_rotating(obj, args.out, "vqgan", step, args.keep_checkpoints)
        raw_model.eval()  # in train mode the quantizer would count the preview as codebook use
        with torch.no_grad():
            recon = raw_model(preview.to(device))[0].float().clamp(-1, 1).cpu()
        raw_model.train()
        save_grid(preview, recon, os.path.join(args.out, f"vqgan_{step:07d}.png"))  # inputs over reconstructions

    # Training loop. The random state is restored last, after everything above has drawn from it.
    if ckpt is not None:
        restore_rng_states(ckpt["rng"], rank, device)
    stop, guard = GracefulStop(), NonFiniteGuard(device, last_good=ckpt_path)
    t0 = last_log = time.time()
    last_log_step = start
    for step in range(start + 1, args.vqgan_steps + 1):
        # One optimizer step = grad_accum micro-batches of --batch-size images on each process.
        micro = [next(batches).to(device, non_blocking=True, memory_format=memory_format)
                 for _ in range(args.grad_accum)]
        # Taming starts the adversarial loss late: a GAN on top of blurry early reconstructions mostly teaches
        # the decoder texture noise, and an early discriminator wins too easily to give useful gradients.
        gan_on = step > args.disc_start
        recons, logs = generator_step(model, raw_model, raw_disc, perceptual, opt_g, micro, gan_on, autocast,
                                      check_dead_codes=step % 10 == 0)  # the check waits for the GPU
        logs["disc"] = discriminator_step(disc, raw_disc, opt_d, micro, recons, autocast) if gan_on else \
            torch.zeros((), device=device)
        guard.update(logs["loss"], step)  # on the device: no waiting for the GPU on ordinary steps

        # Logging is the one place a step waits for the GPU (.tolist() in mean_over_ranks), so it is rare.
        if step % args.log_every == 0 or step == args.vqgan_steps:
            guard.check()
            logs = mean_over_ranks(logs, device)
            if master:
                now = time.time()
                speed = (step - last_log_step) * per_rank * world / (now - last_log)
                eta = (now - t0) / (step - start) * (args.vqgan_steps - step)
                print(f"step {step:>6}/{args.vqgan_steps} | loss {logs['loss']:.4f} rec {logs['rec']:.4f} "
                      f"codebook {logs['codebook']:.4f} gan {logs['gan']:+.3f} (w {logs['gan_weight']:.3f}) "
                      f"disc {logs['disc']:.3f} | psnr {logs['psnr']:.2f} dB | codes used "
                      f"{raw_model.quantizer.usage(args.log_every):.1%} ppl {logs['ppl']:.1f} | "
                      f"{speed:.1f} img/s | eta {format_eta(eta)}", flush=True)
            last_log, last_log_step = time.time(), step
        save_or_stop(step, args.vqgan_steps, args, "vqgan", stop, guard, checkpoint, master)
    if master:
        print(f"stage 1 done: {os.path.join(args.out, 'vqgan.pt')}")
    if dist.is_initialized():
        dist.barrier()  # stage 2 on other ranks reads the vqgan.pt that rank 0 has just written


# -----------------------------------------------------------------------------------------------------------
# Stage 2: the prior (prior.py), trained on a cache of every image's VQGAN tokens and CLIP embedding.


def cache_key(paths, vqgan_sha256, clip_name, image_size):
    """A digest of everything the cached tokens and embeddings depend on: the VQGAN weights (by their
    file's SHA-256), the CLIP, the image size and the image files (path, size, mtime). Any change gives a
    new key and a new cache."""
    clip_id = clip_name if clip_name in clip_loader.MODELS else clip_loader.sha256_of(clip_name)
    files = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    blob = json.dumps([vqgan_sha256, clip_id, image_size, files])
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def build_cache(paths, vq, clip_model, image_size, batch_size, device):
    """Encode every image (center crop, and its mirror image) once: VQGAN token ids (2N, n_tokens) and
    CLIP image embeddings (2N, clip_dim). Row 2i is image i, row 2i + 1 its horizontal flip."""
    dataset = ImageFolder(paths, image_size)
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


def step_randomness(args, step, rows, clip_dim, rank):
    """The condition-dropout mask (rows,) and pseudo-text noise (rows, clip_dim) of this process's rows at
    `step`, cut from the global batch's draws made with a (seed, step) generator: the same numbers whatever
    the number of processes, and reproducible after a resume."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    g = torch.Generator().manual_seed(stable_seed(args.seed, "prior", step))
    drop = torch.rand(rows * world, generator=g) < args.cond_drop
    noise = torch.randn(rows * world, clip_dim, generator=g)
    mine = slice(rank * rows, (rank + 1) * rows)
    return drop[mine], noise[mine]


def prior_step(model, raw_model, opt, micro_batches, with_embed_loss, vq, clip_model, args, autocast):
    """One prior update over micro-batches of (tokens (b, n_tokens), embeddings (b, clip_dim), drop (b,),
    noise (b, clip_dim)). The embedding-reconstruction loss, when on, uses the first micro-batch's first
    --embed-loss-batch images. Returns scalars to log."""
    n = len(micro_batches)
    opt.zero_grad(set_to_none=True)
    ce_sum = embed_loss = torch.zeros((), device=micro_batches[0][0].device)
    for i, (tokens, embeddings, drop, noise) in enumerate(micro_batches):
        condition = prior.pseudo_text_embedding(embeddings, args.pseudo_text_alpha, noise)
        with sync_gradients(model, i == n - 1):
            with autocast:
                logits, _ = model(condition, tokens[:, :-1], drop)  # (b, n_tokens, vocab)
                ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
                loss = ce / n
                if with_embed_loss and i == 0:
                    k = args.embed_loss_batch
                    # Reconstruct the true image embedding (not the noisy one): that is what the image is.
                    embed_loss = prior.embedding_reconstruction_loss(logits[:k], embeddings[:k], vq, clip_model,
                                                                     args.gumbel_tau, args.gumbel_hard)
                    loss = loss + args.embed_loss_weight * embed_loss
            loss.backward()
        ce_sum = ce_sum + ce.detach() / n
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
    opt.step()
    return {"ce": ce_sum, "embed": embed_loss.detach(), "loss": ce_sum + args.embed_loss_weight * embed_loss.detach()}


def train_prior(args, paths, rank, world, device):
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    vqgan_path, vq, clip_model = load_frozen_models(args, device)

    # The cache: built once by rank 0, read by every rank. Encoding is the expensive part of stage 2's set-up
    # (a VQGAN and a CLIP forward per image); training then reads tokens and embeddings from memory, so the
    # prior's steps never touch image files, and the frozen models run only for the embedding loss and grids.
    # Hashed once: the key below and every checkpoint name this exact VQGAN (the file is large at paper scale).
    vqgan_sha256 = clip_loader.sha256_of(vqgan_path)
    key = cache_key(paths, vqgan_sha256, args.clip, args.image_size)
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
    preview = torch.stack([ImageFolder(paths, args.image_size)[i] for i in preview_ids])
    preview_emb = embeddings[[2 * i for i in preview_ids]]
    n_train = 2 * (len(paths) - n_holdout)
    tokens, embeddings = tokens[:n_train], embeddings[:n_train]
    per_rank = args.batch_size * args.grad_accum
    if n_train < per_rank * world:
        sys.exit(f"error: {n_train} training sequences are fewer than one global batch ({per_rank * world}); "
                 f"lower --batch-size or --grad-accum")

    # The prior's vocabulary, sequence length and condition size are read off the VQGAN and CLIP actually used.
    cfg = prior.PRESETS[args.preset]
    cfg = prior.PriorConfig(**{**asdict(cfg), "vocab_size": vq.cfg.codebook_size, "n_tokens": tokens.shape[1],
                               "clip_dim": embeddings.shape[1], "adaln": args.adaln})
    raw_model = prior.Prior(cfg).to(device)
    # Weight decay on matrices only; biases, norms and vectors are left alone (as in nanoGPT).
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.prior_lr, betas=(0.9, 0.95),
                            fused=cuda)
    start, ckpt, ckpt_path = 0, None, None
    if args.resume:
        ckpt, ckpt_path = load_latest(args.out, "prior")
    if ckpt is not None:
        if ckpt["config"]["clip_dim"] != cfg.clip_dim:
            sys.exit(f"error: {ckpt_path} was trained with a CLIP of embedding size {ckpt['config']['clip_dim']} "
                     f"({ckpt['clip']}), but --clip {args.clip} gives {cfg.clip_dim}; pass --clip {ckpt['clip']}")
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        if master:
            print(f"resuming stage 2 from {ckpt_path} at step {start}")
    if start >= args.prior_steps:
        return
    model = wrap_model(raw_model, args, device, world)
    if master:
        print(f"prior {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M params "
              f"({cfg.n_layer} layers, width {cfg.n_embd}, {'prefix + adaLN' if cfg.adaln else 'prefix'} conditioning) | "
              f"{n_train} training sequences of {cfg.n_tokens} tokens, {n_holdout} images held out | "
              f"CLIP {args.clip} ({cfg.clip_dim}-d) | global batch {per_rank * world} "
              f"= {per_rank * world * cfg.n_tokens} tokens/step | lr {args.prior_lr} | device {device} x{world}")

    def checkpoint(step):
        obj = {"kind": "prior", "config": asdict(cfg), "model": raw_model.state_dict(),
               "optimizer": opt.state_dict(), "step": step, "rng": rng_states(device), "clip": args.clip,
               "vqgan": os.path.abspath(vqgan_path), "vqgan_sha256": vqgan_sha256,
               "args": vars(args)}
        if not master:
            return
        save_rotating(obj, args.out, "prior", step, args.keep_checkpoints)
        raw_model.eval()
        samples = raw_model.sample(preview_emb.to(device), temperature=1.0, top_k=100,
                                   generator=torch.Generator(device).manual_seed(args.seed))
        side = math.isqrt(cfg.n_tokens)
        with torch.no_grad(), autocast:
            images = vq.decode(samples.view(-1, side, side)).float().clamp(-1, 1).cpu()
        raw_model.train()
        # Held-out images over the prior's samples from their CLIP embeddings.
        save_grid(preview, images, os.path.join(args.out, f"prior_{step:07d}.png"))

    # Training loop. The random state is restored last, after everything above has drawn from it.
    if ckpt is not None:
        restore_rng_states(ckpt["rng"], rank, device)
    stop, guard = GracefulStop(), NonFiniteGuard(device, last_good=ckpt_path)
    t0 = last_log = time.time()
    last_log_step, embed_loss = start, torch.zeros((), device=device)
    for step in range(start + 1, args.prior_steps + 1):
        # The schedule is a function of the step, so a resume needs no scheduler state.
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args)
        # This rank's rows of the cache and its share of the step's random draws; both are functions of the
        # step alone (see batch_indices and step_randomness), like stage 1's images.
        rows, _ = batch_indices(n_train, per_rank, rank, world, args.seed, step - 1)
        drop, noise = step_randomness(args, step, per_rank, cfg.clip_dim, rank)
        micro = [(tokens[rows[j:j + args.batch_size]].to(device, non_blocking=True),
                  embeddings[rows[j:j + args.batch_size]].to(device, non_blocking=True),
                  drop[j:j + args.batch_size].to(device), noise[j:j + args.batch_size].to(device))
                 for j in range(0, per_rank, args.batch_size)]
        # The embedding-reconstruction loss decodes images and runs CLIP on them, several times the cost of
        # the GPT step; computing it every few steps on a few images keeps its signal at a fraction of the cost.
        with_embed = args.embed_loss_weight > 0 and step % args.embed_loss_every == 0
        logs = prior_step(model, raw_model, opt, micro, with_embed, vq, clip_model, args, autocast)
        guard.update(logs["loss"], step)
        if with_embed:
            embed_loss = logs["embed"]
        if step % args.log_every == 0 or step == args.prior_steps:
            guard.check()
            logs = mean_over_ranks({"ce": logs["ce"], "embed": embed_loss}, device)
            if master:
                now = time.time()
                speed = (step - last_log_step) * per_rank * world * cfg.n_tokens / (now - last_log)
                eta = (now - t0) / (step - start) * (args.prior_steps - step)
                print(f"step {step:>6}/{args.prior_steps} | ce {logs['ce']:.4f} embed {logs['embed']:.4f} | "
                      f"lr {lr_at(step - 1, args):.2e} | {speed:,.0f} tokens/s | eta {format_eta(eta)}", flush=True)
            last_log, last_log_step = time.time(), step
        save_or_stop(step, args.prior_steps, args, "prior", stop, guard, checkpoint, master)
    if master:
        print(f"stage 2 done: {os.path.join(args.out, 'prior.pt')}")


def main(argv=None):
    """Both stages in one process group: under torchrun every process runs this, and they meet in the
    collective calls (gradient all-reduce, logging, checkpoints, barriers)."""
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        paths = readable_images(find_images(args.data), report=rank == 0)
        if args.stage in ("vqgan", "all"):
            train_vqgan(args, paths, rank, world, device)
        if args.stage in ("prior", "all"):
            train_prior(args, paths, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
