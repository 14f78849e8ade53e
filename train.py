"""
train.py: trains CLIP-GEN from images alone (a folder, or WebDataset tar shards), no captions needed.

    python train.py --data imgs/                                   # both stages, paper sizes (a GPU job)
    python train.py --data imgs/ --stage vqgan                     # stage 1 only; --stage prior for stage 2
    python train.py --data imgs/ --prior diffusion                 # CLIP-VQDiffusion's prior instead of the GPT
    python train.py --data imgs/ --preset small                    # 64-px models that train on a CPU
    torchrun --nproc_per_node=8 train.py --data imgs/              # the same on 8 GPUs (DDP)
    torchrun --nproc_per_node=8 train.py --data 'shards/{00000..00999}.tar'   # tar shards (img2dataset's)

The story, top to bottom: the command line; stage 1, the VQGAN, trained on random crops of the images;
stage 2, the prior, trained on every image's VQGAN tokens and CLIP embedding; main. The losses live in the
model files (vqgan.generator_loss; prior.clipgen_loss, or diffusion.diffusion_loss with --prior diffusion),
the plumbing (processes, checkpoints, random states, signals, the NaN guard) in runtime.py. Under torchrun
every process runs all of this on its share of each batch; rank 0 alone prints and writes files.

Steps are counted from 0: `step` is the number of optimizer updates done, and so also the index of the
next one. The data, learning rate and random draws of update `step` are functions of `step` alone, which
is what makes a resumed run equal an uninterrupted one and 2 processes equal 1.
"""
import argparse
import math
import os
from dataclasses import asdict, replace

import torch
from torch.utils.data import DataLoader

import clip_loader
import data
import diffusion
import prior
import runtime
import vqgan
from clipgen import PRESETS, RECIPE_FIELDS
from runtime import at_least, fail

# -----------------------------------------------------------------------------------------------------------
# The command line. Every default lives here, once, next to its help text (--help and the README show it).
# Each flag's type checks its value where the flag is defined (runtime.at_least and friends), so a bad value
# is refused in one line naming the flag; parse_args then checks what involves several flags.


def recipe_help(text, name):
    """Help for a flag whose default comes from the preset's recipe (clipgen.PRESETS)."""
    values = ", ".join(f"{p} {getattr(r, name)}" for p, r in PRESETS.items())
    return f"{text} (default: the preset's; {values})"


def prior_shape_help(text, field):
    """Help for a flag whose default is a field of the preset's prior (the diffusion prior's where it differs)."""
    values = []
    for name, preset in PRESETS.items():
        gpt, diff = getattr(preset.prior, field), getattr(preset.diffusion, field)
        values.append(f"{name} {gpt}" + (f" (diffusion {diff})" if diff != gpt else ""))
    return f"{text} (default: the preset's; {', '.join(values)})"


def build_parser():
    """Every flag of train.py, in --help's order (a test checks the README's table against it)."""
    p = argparse.ArgumentParser(description="Train CLIP-GEN on a folder of images (no captions).",
                                formatter_class=runtime.HelpFormatter)
    p.add_argument("--data", required=True,
                   help="images: a folder searched recursively for jpg/png/webp/bmp files and .tar shards "
                        "(WebDataset layout), one .tar, or a shard pattern such as 'shards/{00000..00099}.tar'")
    p.add_argument("--out", default="out", type=runtime.folder, help="run folder: checkpoints, sample grids, caches")
    p.add_argument("--stage", default="all", choices=["vqgan", "prior", "all"],
                   help="'vqgan' = stage 1, 'prior' = stage 2 (needs OUT/vqgan.pt), 'all' = both in turn")
    p.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="model sizes and training recipe: 'paper' is CLIP-GEN's, 'small' trains 64-px images on 2 "
                        "CPU cores in about 30 minutes, 'tiny' checks the plumbing in minutes")
    # Stage 2 always encodes at the size stage 1 trained at (vqgan.pt's), so --image-size is stage 1's alone.
    p.add_argument("--image-size", type=int, help="stage-1 training resolution, a multiple of the preset's "
                                                  "downsampling (default: the preset's)")
    p.add_argument("--batch-size", type=at_least(1), help=recipe_help("images per process per step", "batch_size"))
    # The global batch decides the data order (data.batch_indices), so a resume must keep it: any split of it
    # into --batch-size, --grad-accum and processes trains alike.
    p.add_argument("--grad-accum", type=at_least(1), default=1,
                   help="micro-batches per optimizer step; global batch = batch size x this x processes")
    p.add_argument("--resume", action="store_true", help="continue exactly where the run in --out stopped "
                                                         "(weights, optimizers, step, data position, random state)")
    # A finished run is never trained over by accident: parse_args refuses it unless one of these two says how.
    p.add_argument("--overwrite", action="store_true", help="train from step 0 and replace the checkpoints in --out")
    # Older checkpoints are deleted only after a new one is written: a crash mid-write leaves the previous one.
    p.add_argument("--keep-checkpoints", type=at_least(1), default=3, help="step checkpoints kept in OUT/checkpoints")
    # Exact resume replays the data order, so a resume stops when --data has changed, unless told to go on.
    p.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume: train on --data as it is now, though images were added, removed or edited")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (faster on GPU after a warm-up)")
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                   help="mixed precision: 'auto' is bf16 on a GPU that has it, fp16 (with a gradient scaler) on one "
                        "that does not, fp32 on a CPU")
    add_stage1_flags(p.add_argument_group("stage 1: VQGAN"))
    add_stage2_flags(p.add_argument_group("stage 2: prior"))
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="random seed of data order, augmentation and initialisation")
    g.add_argument("--log-every", type=at_least(1), default=50, help="steps between progress lines")
    g.add_argument("--save-every", type=at_least(1), default=1000, help="steps between checkpoints and sample grids")
    # Decoding and augmenting images runs beside the step in these processes: on a GPU it is often the bottleneck.
    g.add_argument("--workers", type=at_least(0),
                   help="data-loading processes per GPU/process (default: 4, or the CPU cores if fewer)")
    g.add_argument("--device", default="auto", type=runtime.device_name,
                   help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")
    return p


def add_stage1_flags(g):
    """Flags of stage 1; those that default to the preset's recipe say so."""
    g.add_argument("--vqgan-steps", type=at_least(1), help=recipe_help("optimizer steps of stage 1", "vqgan_steps"))
    g.add_argument("--vqgan-lr", type=runtime.positive,
                   help=recipe_help("Adam learning rate of the VQGAN and discriminator", "vqgan_lr"))
    g.add_argument("--disc-start", type=at_least(0), help=recipe_help("step at which the adversarial loss and "
                                                                      "discriminator training start", "disc_start"))
    g.add_argument("--perceptual", choices=["vgg", "none"],
                   help=recipe_help("perceptual loss network; 'vgg' downloads torchvision's VGG16 weights once",
                                    "perceptual"))
    # Seeing each shape in nearby colours teaches the tokenizer to pass any colour through any shape.
    g.add_argument("--hue-jitter", type=runtime.between(0, 0.5), default=0.0,
                   help="rotate the hues of each stage-1 training image by up to +-this fraction of the colour wheel")


def add_stage2_flags(g):
    """Flags of stage 2. Both priors take them all, except the few that say which prior they belong to."""
    g.add_argument("--prior", default="ar", choices=["ar", "diffusion"],
                   help="'ar' = CLIP-GEN's GPT (prior.py), 'diffusion' = CLIP-VQDiffusion's model (diffusion.py)")
    g.add_argument("--clip", default="ViT-B/32", help="CLIP model name or checkpoint path (see clip_loader.py)")
    g.add_argument("--prior-steps", type=at_least(1), help=recipe_help("optimizer steps of stage 2", "prior_steps"))
    g.add_argument("--prior-lr", type=runtime.positive, help=recipe_help("peak AdamW learning rate of the prior",
                                                                         "prior_lr"))
    # Where stage 2's compute goes: depth and width of either prior (the heads keep the preset's size).
    g.add_argument("--prior-layers", type=at_least(1), help=prior_shape_help("transformer blocks of the prior", "n_layer"))
    g.add_argument("--prior-width", type=at_least(1),
                   help=prior_shape_help("width of the prior, a multiple of its heads' size", "n_embd"))
    g.add_argument("--warmup", type=at_least(1), help="linear warm-up steps, then cosine decay to 10%% (default: "
                                                      "1000, or a tenth of --prior-steps if that is less)")
    g.add_argument("--weight-decay", type=at_least(0.0), default=0.01, help="AdamW weight decay of the matrices")
    g.add_argument("--grad-clip", type=at_least(0.0), default=1.0, help="max global gradient norm (0: off)")
    # CLIP-GEN gives no lambda we could confirm; 0.1 keeps the loss (1 - cosine) below the cross-entropy's scale.
    g.add_argument("--embed-loss-weight", type=at_least(0.0), help="lambda of CLIP-GEN's embedding-reconstruction "
                                                                   "loss, GPT prior only (default: 0.1; 0: off)")
    g.add_argument("--aux-loss-weight", type=at_least(0.0),
                   help=recipe_help("lambda of VQ-Diffusion's auxiliary x0 cross-entropy, diffusion prior only",
                                    "aux_loss_weight"))
    # The embedding loss decodes images and runs CLIP with their backward passes, several GPT steps' worth:
    # every few steps, on a few images, keeps its signal at a fraction of the cost.
    g.add_argument("--embed-loss-every", type=at_least(1), default=4, help="compute the embedding loss every k steps")
    g.add_argument("--embed-loss-batch", type=at_least(1), default=4, help="...on this many images of the batch")
    g.add_argument("--gumbel-tau", type=runtime.positive, default=1.0, help="Gumbel-softmax temperature of that loss")
    g.add_argument("--gumbel-hard", action="store_true", help="straight-through one-hot Gumbel samples")
    g.add_argument("--embed-pred-weight", type=at_least(0.0), default=0.0,
                   help="weight of an auxiliary loss: every position of the GPT prior predicts the image's CLIP "
                        "embedding (ours; 0: off)")
    # Noise around the image embedding, so that the prior accepts the text embeddings it meets at inference.
    g.add_argument("--pseudo-text-alpha", type=at_least(0.0), default=0.0,
                   help="noise level of pseudo-text embeddings (CLIP-VQDiffusion/LAFITE); 0: off, as CLIP-GEN")
    # A row trained with the learned null condition teaches the same weights an unconditional model, which
    # classifier-free guidance (sample.py --guidance) contrasts with the conditional one.
    g.add_argument("--cond-drop", type=runtime.between(0, 1, high_open=True), default=0.1,
                   help="probability of training with the null condition, for classifier-free guidance")
    # Colour is bound to shape in the images; rotated hues show the prior shapes in colours they never had.
    g.add_argument("--hue-copies", type=at_least(0),
                   help=recipe_help("also train stage 2 on this many copies of every image with its hues rotated "
                                    "at random", "hue_copies"))
    g.add_argument("--adaln", action="store_true",
                   help="adaptive-LayerNorm conditioning in every block of the GPT (the diffusion prior always has it)")
    # Ours: the mean of the image embeddings points mostly along CLIP's modality gap (prior.unit_condition).
    g.add_argument("--remove-mean", action=argparse.BooleanOptionalAction,
                   help=recipe_help("project the training images' mean CLIP embedding out of every condition, "
                                    "images' and prompts' alike", "remove_mean"))


def parse_args(argv=None):
    """The command line with every default filled in, and the checks that involve several flags (or the run
    folder), all before anything expensive starts."""
    p = build_parser()
    args = p.parse_args(argv)
    # Before the recipe fills it in: only a --aux-loss-weight the user gave is a mistake on a GPT run.
    if args.prior == "ar" and args.aux_loss_weight is not None:
        p.error("--aux-loss-weight weighs a loss of the diffusion prior; add --prior diffusion, or drop it")
    # A recipe flag left out means the preset's value, which is known only once --preset is.
    preset = PRESETS[args.preset]
    for name in RECIPE_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    args.warmup = args.warmup or min(1000, max(1, args.prior_steps // 10))
    args.workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
    args.embed_loss_weight = (0.1 if args.prior == "ar" else 0.0) if args.embed_loss_weight is None \
        else args.embed_loss_weight
    # Each prior has its own auxiliary loss and conditioning; asking for the other's is a mistake, not a no-op.
    if args.prior == "diffusion" and args.embed_loss_weight > 0:
        p.error("--embed-loss-weight is CLIP-GEN's loss for the GPT prior; the diffusion prior does not use it")
    if args.prior == "diffusion" and args.embed_pred_weight > 0:
        p.error("--embed-pred-weight trains a head of the GPT prior; the diffusion prior has none")
    if args.prior == "diffusion" and args.adaln:
        p.error("--adaln is an option of the GPT prior; the diffusion prior is always conditioned by adaLN")
    head_size = preset_prior(args).head_size
    if args.prior_width is not None and args.prior_width % head_size:
        p.error(f"--prior-width {args.prior_width}: give a multiple of {head_size}, the size of the "
                f"--preset {args.preset} prior's attention heads")
    downsample = preset.vqgan.downsample
    if args.image_size is not None and (args.image_size < downsample or args.image_size % downsample):
        p.error(f"--image-size must be a positive multiple of {downsample} for preset {args.preset!r}")
    # A finished run is never trained over by accident: --resume or --overwrite must say which.
    stages = {"all": ("vqgan", "prior"), "vqgan": ("vqgan",), "prior": ("prior",)}[args.stage]
    trained = [f"{k}.pt" for k in stages if os.path.exists(os.path.join(args.out, f"{k}.pt"))]
    if trained and not (args.resume or args.overwrite):
        p.error(f"--out {args.out!r} already holds {' and '.join(trained)}; continue that run with --resume, train "
                f"into another --out, or pass --overwrite to replace it")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one")
    # Checked now, not when stage 2 starts hours later.
    if "prior" in stages and args.clip not in clip_loader.MODELS and not os.path.isfile(args.clip):
        p.error(f"--clip {args.clip!r} is neither a model name ({', '.join(clip_loader.MODELS)}) nor a file")
    return args


# -----------------------------------------------------------------------------------------------------------
# What both stages do before their loop: size the global batch, and find the point to resume from.


def global_batch(n_items, what, args, proc):
    """Items per optimizer step over all processes; a data set smaller than that can not fill one step."""
    size = args.batch_size * args.grad_accum * proc.world
    if n_items < size:
        fail(f"{n_items} {what} are fewer than one global batch ({size}); lower --batch-size or --grad-accum")
    return size


def resume_point(args, kind, cfg, batch, proc, vqgan_sha256=None):
    """-> (checkpoint, its path, the config to build, the first step): with --resume, the newest readable
    checkpoint of `kind`, once its flags are known to build the same model and feed the same data (and, for
    the prior, the VQGAN to be the one it was trained on); else a fresh start from `cfg`. The run describes
    itself: the model is rebuilt from the config it saved."""
    ckpt, path = runtime.latest_checkpoint(args.out, kind, proc) if args.resume else (None, None)
    if ckpt is None:
        return None, None, cfg, 0
    if "rng" not in ckpt:  # toyworld.py bundle keeps the weights, not the random states every resume restores
        fail(f"{path} holds weights only (a bundled model, as toymodel/): it can not be resumed. Train a new prior "
             f"on its VQGAN in another --out holding a copy of that vqgan.pt, with --stage prior")
    if proc.master:
        print(f"resuming stage {1 if kind == 'vqgan' else 2} from {path} at step {ckpt['step']}")
    fingerprint = None if args.accept_changed_data else args.data_fingerprint
    runtime.refuse_changed_run(ckpt, path, asdict(cfg), args.prior, args.preset, args.seed, batch,
                               (args.clip, args.clip_sha256), fingerprint, args.hue_copies if kind == "prior" else None)
    if vqgan_sha256 is not None and ckpt["vqgan_sha256"] != vqgan_sha256:
        fail(f"{os.path.join(args.out, 'vqgan.pt')} is not the VQGAN {path} was trained with; resuming would "
             f"pair the prior with other tokens. Train the prior into a new --out")
    saved = prior.saved_config(type(cfg), ckpt["config"]) if kind == "prior" else type(cfg)(**ckpt["config"])
    return ckpt, path, saved, ckpt["step"]


# -----------------------------------------------------------------------------------------------------------
# Stage 1: the VQGAN (vqgan.py), trained on random crops of the images (CLIP-GEN section 3.1, taming's recipe).
# Each step updates the generator (encoder, codebook, decoder) on its reconstruction, codebook and, from
# --disc-start on, adversarial losses, then the PatchGAN discriminator on the same images and reconstructions.
# The two never share a backward pass, so neither can change the other's weights.

PREVIEW_IMAGES = 8  # images in each stage-1 grid (training images, center crops: inputs over reconstructions)
DEAD_CODE_CHECK_EVERY = 10  # steps between dead-code checks; each one waits for the GPU


def generator_step(model, raw_model, raw_disc, perceptual, opt_g, micro_batches, gan_on, autocast,
                   check_dead_codes=True, scaler=runtime.NO_SCALER):
    """One update of the encoder, codebook and decoder over micro-batches (gradient accumulation), with
    vqgan.generator_loss, under `autocast` (and with fp16, its gradient `scaler`). The discriminator is
    called unwrapped and frozen, so this step can never change it. Returns the detached reconstructions and
    a dict of scalar tensors (means over micro-batches)."""
    n = len(micro_batches)
    # Frozen, not merely left out of opt_g: it would otherwise collect gradients of the generator's loss.
    raw_disc.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    recons, logs = [], {}
    for i, images in enumerate(micro_batches):
        with runtime.sync_gradients(model, i == n - 1):
            with autocast:
                recon, ids, codebook_loss = model(images)
                fake_logits = raw_disc(recon) if gan_on else None
                loss, parts = vqgan.generator_loss(images, recon, codebook_loss, fake_logits,
                                                   raw_model.decoder.conv_out.weight, raw_model.cfg, perceptual)
            # A mean over micro-batches: n of them equal one n times larger.
            scaler.scale(loss / n).backward()
        recons.append(recon.detach())
        parts |= {"psnr": vqgan.psnr(recon.detach(), images),
                  "ppl": vqgan.codebook_perplexity(ids, raw_model.cfg.codebook_size)}
        logs = {k: logs.get(k, 0) + v / n for k, v in parts.items()}
    scaler.step(opt_g)
    scaler.update()
    # After the step, so that a restarted code is not moved by gradients computed for its old value.
    raw_model.quantizer.restart_dead_codes(check=check_dead_codes)
    return recons, logs


def discriminator_step(disc, raw_disc, opt_d, micro_batches, recons, autocast, scaler=runtime.NO_SCALER):
    """One PatchGAN update with the hinge loss; `recons` are detached, so no gradient reaches the VQGAN."""
    raw_disc.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    total = 0.0
    for i, (images, recon) in enumerate(zip(micro_batches, recons)):
        with runtime.sync_gradients(disc, i == len(recons) - 1):
            with autocast:
                d_loss = vqgan.hinge_d_loss(disc(images).float(), disc(recon).float())
            scaler.scale(d_loss / len(recons)).backward()
        total = total + d_loss.detach() / len(recons)
    scaler.step(opt_d)
    scaler.update()
    return total


def vqgan_models(cfg, args, ckpt, proc):
    """The VQGAN, its discriminator, the perceptual loss (or None), their Adam optimizers (beta1 = 0.5, as
    taming: GAN training is unstable with more momentum) and gradient scalers (pass-throughs unless fp16),
    restored from `ckpt` if resuming. channels_last (NHWC) lets cuDNN use tensor-core convolutions without
    layout transposes, and saves oneDNN its layout reorders on a CPU."""
    device = proc.device
    raw_model = vqgan.VQGAN(cfg).to(device, memory_format=torch.channels_last)
    raw_disc = vqgan.PatchDiscriminator(cfg).to(device, memory_format=torch.channels_last)
    perceptual = None
    if args.perceptual == "vgg":
        try:
            perceptual = vqgan.PerceptualLoss().to(device, memory_format=torch.channels_last)
        except RuntimeError as e:
            fail(e)
    # Fused: one kernel updates all the parameters, on a CPU too, where the default loops over them in Python.
    opt_g = torch.optim.Adam(raw_model.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9), fused=True)
    opt_d = torch.optim.Adam(raw_disc.parameters(), lr=args.vqgan_lr, betas=(0.5, 0.9), fused=True)
    scalers = proc.grad_scaler(), proc.grad_scaler()
    if ckpt is not None:
        for part, key in ((raw_model, "model"), (raw_disc, "discriminator"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            part.load_state_dict(ckpt[key])
        for scaler, key in zip(scalers, ("scaler_g", "scaler_d")):
            if key in ckpt:  # checkpoints from before --precision hold none
                scaler.load_state_dict(ckpt[key])
    return raw_model, raw_disc, perceptual, opt_g, opt_d, *scalers


def train_vqgan(args, images, proc):
    """Stage 1, from step 0 or (--resume) from the newest checkpoint, up to --vqgan-steps. Writes
    OUT/vqgan.pt (the newest checkpoint, which stage 2 and sample.py read), OUT/checkpoints/vqgan_STEP.pt and
    a grid of training images over their reconstructions at every checkpoint, OUT/vqgan_STEP.png."""
    # A stream per process: DDP starts every process from rank 0's weights, and what must agree across
    # processes (data order, augmentation, stage 2's draws) comes from generators seeded by the step instead.
    torch.manual_seed(args.seed + proc.rank)
    cfg = PRESETS[args.preset].vqgan
    cfg = replace(cfg, image_size=args.image_size or cfg.image_size)  # the convolutions take any multiple
    batch = global_batch(len(images), "images", args, proc)
    ckpt, ckpt_path, cfg, start = resume_point(args, "vqgan", cfg, batch, proc)
    # Nothing left to do: `--stage all --resume` after stage 1 had finished.
    if start >= args.vqgan_steps:
        return
    raw_model, raw_disc, perceptual, opt_g, opt_d, scaler_g, scaler_d = vqgan_models(cfg, args, ckpt, proc)
    # Compiled and DDP-wrapped copies do the training; the plain modules are what checkpoints save. The
    # adaptive GAN weight differentiates the generator's loss twice through one graph.
    model = runtime.wrap_model(raw_model, args.compile, proc, double_backward=True)
    disc = runtime.wrap_model(raw_disc, args.compile, proc)

    # Data: this process's share of each step's images from step `start` on, decoded and augmented by worker
    # processes in parallel with the step; pinned memory lets the copy to the GPU run asynchronously.
    dataset = data.ImageFolder(images, cfg.image_size, seed=args.seed, hue_jitter=args.hue_jitter)
    sampler = data.StepSampler(len(images), batch // proc.world, proc.rank, proc.world, args.seed, start)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=proc.device.type == "cuda", persistent_workers=args.workers > 0)
    # Before the random state is restored: creating the iterator draws a seed.
    batches = iter(loader)
    # The same images in every checkpoint's grid, so that the grids show the tokenizer learning.
    preview = torch.stack([dataset[i] for i in range(min(PREVIEW_IMAGES, len(images)))])
    if proc.master:
        side = cfg.tokens_per_side
        print(f"VQGAN {runtime.millions(raw_model)}M params, discriminator {runtime.millions(raw_disc)}M | "
              f"{len(images)} images, {cfg.image_size}px -> {side}x{side} tokens, codebook {cfg.codebook_size} | "
              f"device {proc.device} x{proc.world} {proc.precision} | "
              f"global batch {batch} ({args.batch_size} x {args.grad_accum} accumulation x {proc.world} processes)")

    # The random state is restored last, after everything above has drawn from it.
    if ckpt is not None:
        runtime.restore_process_state(ckpt["rng"], proc)
    stop, meter = runtime.GracefulStop(), runtime.Meter(start)
    guard = runtime.NonFiniteGuard(proc.device, last_good=ckpt_path)
    step = start
    while step < args.vqgan_steps:
        # One optimizer update = grad_accum micro-batches of --batch-size images on each process.
        micro = [next(batches).to(proc.device, non_blocking=True, memory_format=torch.channels_last)
                 for _ in range(args.grad_accum)]
        # Taming starts the adversarial loss late: a GAN on top of blurry early reconstructions mostly teaches
        # the decoder texture noise, and an early discriminator wins too easily to give useful gradients.
        gan_on = step >= args.disc_start
        recons, logs = generator_step(model, raw_model, raw_disc, perceptual, opt_g, micro, gan_on, proc.autocast(),
                                      step % DEAD_CODE_CHECK_EVERY == 0, scaler_g)
        logs["disc"] = discriminator_step(disc, raw_disc, opt_d, micro, recons, proc.autocast(), scaler_d) \
            if gan_on else torch.zeros((), device=proc.device)
        # Checked on the device: ordinary steps do not wait for the GPU.
        guard.update(logs["loss"], step)
        step += 1

        # Logging is the one place a step waits for the GPU (.tolist() in mean_over_ranks), so it is rare.
        if step % args.log_every == 0 or step == args.vqgan_steps:
            guard.check()
            logs = runtime.mean_over_ranks(logs, proc.device)
            if proc.master:
                print(f"step {step:>6}/{args.vqgan_steps} | loss {logs['loss']:.4f} rec {logs['rec']:.4f} "
                      f"codebook {logs['codebook']:.4f} gan {logs['gan']:+.3f} (w {logs['gan_weight']:.3f}) "
                      f"disc {logs['disc']:.3f} | psnr {logs['psnr']:.2f} dB | codes used "
                      f"{raw_model.quantizer.usage(args.log_every):.1%} ppl {logs['ppl']:.1f} | "
                      f"{meter.rate(step, batch):.1f} img/s | eta {meter.eta(step, args.vqgan_steps)}", flush=True)
        # A checkpoint every --save-every steps, at the end, and when a signal asks the run to stop.
        stopping = stop.requested(step, proc.device)
        if step % args.save_every == 0 or step == args.vqgan_steps or stopping:
            guard.check()
            ckpt = runtime.checkpoint("vqgan", cfg, step, batch, args, proc, model=raw_model.state_dict(),
                                      discriminator=raw_disc.state_dict(), opt_g=opt_g.state_dict(),
                                      opt_d=opt_d.state_dict(), scaler_g=scaler_g.state_dict(),
                                      scaler_d=scaler_d.state_dict())
            guard.last_good = runtime.save_checkpoint(ckpt, args.out, "vqgan", step, args.keep_checkpoints, proc,
                                                      lambda grid: runtime.save_vqgan_grid(raw_model, preview, grid,
                                                                                           proc.device))
        if stopping:
            stop.exit(step, proc)
    if proc.master:
        print(f"stage 1 done: {os.path.join(args.out, 'vqgan.pt')}")


# -----------------------------------------------------------------------------------------------------------
# Stage 2: the prior (prior.py or diffusion.py; CLIP-GEN section 3.2), trained to write an image's VQGAN tokens
# given its CLIP image embedding. The frozen VQGAN and CLIP first encode every image once into a cache
# (runtime.cached_tokens_and_embeddings), so that the prior's steps never touch an image file and the frozen
# models run only for the embedding loss and the grids. Text appears nowhere: at inference a prompt's CLIP
# text embedding takes the image embedding's place (clipgen.py).

def frozen_models(args, proc):
    """-> (the VQGAN of OUT/vqgan.pt, its file's SHA-256, the CLIP), frozen: stage 2 only reads them."""
    vqgan_path = os.path.join(args.out, "vqgan.pt")
    if not os.path.exists(vqgan_path):
        fail(f"no VQGAN checkpoint at {vqgan_path}. Train stage 1 first "
             f"(python train.py --data {args.data} --out {args.out} --stage vqgan) or use --stage all")
    # Frozen (and in eval mode): the embedding loss's gradient flows through them to the prior alone.
    try:
        vq, vq_ckpt = vqgan.load_vqgan(vqgan_path, proc.device)
        clip_model = clip_loader.load(args.clip, device=proc.device)[0].requires_grad_(False)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(e)
    vq.requires_grad_(False)
    # A run begun with --stage all named its CLIP: stage 2 keeps it unless told to start the prior afresh.
    if not args.overwrite:
        runtime.refuse_other_clip(vq_ckpt.get("args", {}), vqgan_path, args.clip, args.clip_sha256)
    # The token grid is the VQGAN's: its image size decides it, whatever the preset says.
    if args.image_size not in (None, vq.cfg.image_size):
        fail(f"--image-size {args.image_size} but {vqgan_path} was trained at {vq.cfg.image_size} px; stage 2 "
             f"encodes images at the VQGAN's size, so drop --image-size for --stage prior")
    # Hashed once here: the cache key and every checkpoint name this exact VQGAN.
    return vq, clip_loader.sha256_of(vqgan_path), clip_model


def lr_at(step, peak, warmup, total):
    """Linear warm-up to `peak`, then cosine decay to a tenth of it at the last step. A function of the step,
    so a resume needs no scheduler state."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def step_randomness(seed, step, rows, cfg, cond_drop, proc):
    """This process's rows' random draws at `step`, cut from the global batch's draws made with a (seed,
    step) generator: the same numbers whatever the number of processes, and reproducible after a resume.
    -> {"drop": (rows,) condition dropout, "noise": (rows, clip_dim) pseudo-text noise}, and for the diffusion
    prior the forward process's draws: "t" (rows,) steps in 1..T, "uniform" and "codes" (rows, n_tokens)."""
    # Drawn on the CPU from their own generator: the same numbers on any device, whatever else drew before.
    g = torch.Generator().manual_seed(data.stable_seed(seed, "prior", step))
    n = rows * proc.world
    draws = {"drop": torch.rand(n, generator=g) < cond_drop, "noise": torch.randn(n, cfg.clip_dim, generator=g)}
    if isinstance(cfg, diffusion.DiffusionConfig):
        draws["t"] = torch.randint(1, cfg.n_steps + 1, (n,), generator=g)
        draws["uniform"] = torch.rand(n, cfg.n_tokens, generator=g)
        draws["codes"] = torch.randint(cfg.vocab_size, (n, cfg.n_tokens), generator=g)
    return {k: v[proc.rank * rows:(proc.rank + 1) * rows] for k, v in draws.items()}


def micro_batches(tokens, embeddings, rows, draws, b, device):
    """A step's cache rows and random draws, cut into micro-batches of b rows on the device: [(tokens
    (b, n_tokens), embeddings (b, clip_dim), draws {name: (b, ...)})], what prior_step takes."""
    return [(data.read_rows(tokens, rows[j:j + b]).to(device, non_blocking=True),
             data.read_rows(embeddings, rows[j:j + b]).to(device, non_blocking=True),
             {k: v[j:j + b].to(device) for k, v in draws.items()}) for j in range(0, len(rows), b)]


def prior_step(model, raw_model, opt, micro_batches, embed_rows, vq, clip_model, args, autocast,
               scaler=runtime.NO_SCALER):
    """One prior update over micro-batches of (tokens (b, n_tokens), embeddings (b, clip_dim), draws: a dict
    of step_randomness's (b, ...) tensors), with the prior's loss: prior.clipgen_loss for the GPT, whose
    embedding-reconstruction loss, when embed_rows > 0, uses the first micro-batch's first embed_rows images;
    diffusion.diffusion_loss for the diffusion prior. Returns scalars to log: the loss and its two terms
    (ce and embed, or vlb and aux), each a mean over micro-batches (embed: the first micro-batch's)."""
    n = len(micro_batches)
    opt.zero_grad(set_to_none=True)
    logs = {}
    for i, (tokens, embeddings, draws) in enumerate(micro_batches):
        # Pseudo-text noise moves the condition only: the embedding loss still targets the image's embedding.
        condition = prior.pseudo_text_embedding(embeddings, args.pseudo_text_alpha, draws["noise"])
        with runtime.sync_gradients(model, i == n - 1):
            with autocast:
                if args.prior == "diffusion":
                    # VQ-Diffusion: corrupt the tokens to a random step t of the forward process (masks and
                    # random codes), then predict the clean tokens from what is left.
                    x_t = raw_model.schedule.corrupt(tokens, draws["t"], draws["uniform"], draws["codes"])
                    logits = model(condition, x_t, draws["t"], draws["drop"])  # (b, n_tokens, vocab)
                    loss, *terms = diffusion.diffusion_loss(logits, tokens, x_t, draws["t"], raw_model.schedule,
                                                            args.aux_loss_weight)
                    names = ("vlb", "aux")
                else:
                    # Teacher forcing: after the condition's prefix, tokens 0..n-2 predict tokens 0..n-1.
                    predicting = raw_model.cfg.embed_head
                    out = model(condition, tokens[:, :-1], draws["drop"], predict_embedding=predicting)
                    logits, predicted = out if predicting else (out, None)  # (b, n_tokens, vocab / clip_dim)
                    loss, *terms = prior.clipgen_loss(logits, tokens, embeddings, draws["drop"],
                                                      args.embed_loss_weight, embed_rows if i == 0 else 0, vq,
                                                      clip_model, args.gumbel_tau, args.gumbel_hard)
                    names = ("ce", "embed")
                    if predicting:
                        pred = prior.embedding_prediction_loss(predicted, embeddings, raw_model.embedding_mean)
                        loss, terms, names = loss + args.embed_pred_weight * pred, [*terms, pred], (*names, "pred")
            scaler.scale(loss / n).backward()
        for name, value in zip(("loss", *names), (loss, *terms)):
            if name == "embed":  # computed on the first micro-batch alone
                logs.setdefault(name, value.detach())
            else:
                logs[name] = logs.get(name, 0) + value.detach() / n
    # Clipped after the backward passes, when DDP has averaged the gradients: every process clips alike.
    if args.grad_clip > 0:
        scaler.unscale_(opt)  # the norm of the true gradients, not of fp16's scaled ones
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()
    return logs


def preset_prior(args):
    """The --preset's config of the --prior."""
    return PRESETS[args.preset].diffusion if args.prior == "diffusion" else PRESETS[args.preset].prior


def prior_config(args, vq, clip_model):
    """The preset's prior (--prior) with its vocabulary, sequence length and condition size read off the
    VQGAN and CLIP actually used, its depth and width from the flags, and the conditioning flags."""
    base = preset_prior(args)
    sizes = dict(vocab_size=vq.cfg.codebook_size, n_tokens=vq.cfg.tokens_per_side ** 2,
                 clip_dim=clip_model.arch.embed_dim, remove_mean=args.remove_mean,
                 n_layer=args.prior_layers or base.n_layer)
    if args.prior_width is not None:
        sizes.update(n_embd=args.prior_width, n_head=args.prior_width // base.head_size)
    if args.prior == "diffusion":
        return replace(base, **sizes)
    return replace(base, adaln=args.adaln, embed_head=args.embed_pred_weight > 0, **sizes)


def prior_model(cfg, args, embeddings, n_train, ckpt, proc):
    """The prior (--prior), its AdamW optimizer and gradient scaler (a pass-through unless fp16), restored from
    `ckpt` if resuming. The training images' mean embedding is stored in the model, for --remove-mean."""
    device = proc.device
    raw_model = (diffusion.DiffusionPrior if args.prior == "diffusion" else prior.Prior)(cfg).to(device)
    # Of the training rows alone: held-out images must not shape the model, not even through this mean.
    raw_model.embedding_mean.copy_(embeddings.mean_of_unit_rows(n_train))
    # Weight decay on matrices only; biases, norms and vectors are left alone (as in nanoGPT).
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    # beta2 = 0.95, as nanoGPT and GPT-3: the second moment adapts faster, which keeps transformers stable.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.prior_lr, betas=(0.9, 0.95),
                            fused=True)
    scaler = proc.grad_scaler()
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:  # checkpoints from before --precision hold none
            scaler.load_state_dict(ckpt["scaler"])
    return raw_model, opt, scaler


def train_prior(args, images, proc):
    """Stage 2 on top of OUT/vqgan.pt, from step 0 or (--resume) from the newest checkpoint, up to
    --prior-steps. Writes OUT/prior.pt, OUT/checkpoints/prior_STEP.pt and a grid of held-out images over
    samples from their CLIP image embeddings at every checkpoint, OUT/prior_STEP.png."""
    torch.manual_seed(args.seed + proc.rank)
    vq, vqgan_sha256, clip_model = frozen_models(args, proc)
    # Rows 0..n_train-1 of the cache: the images stage 2 trains on, their flips and their hue copies.
    n_holdout = data.holdout_count(len(images))
    n_train = data.cache_rows_per_image(args.hue_copies) * (len(images) - n_holdout)
    batch = global_batch(n_train, "training sequences", args, proc)
    # Before the cache: a resume that is refused must not first spend minutes encoding the images.
    ckpt, ckpt_path, cfg, start = resume_point(args, "prior", prior_config(args, vq, clip_model), batch, proc,
                                               vqgan_sha256)
    if start >= args.prior_steps:
        return
    # From here on: a signal during the cache build must not wait for all of it.
    stop = runtime.GracefulStop()
    tokens, embeddings = runtime.cached_tokens_and_embeddings(images, args.data_fingerprint, vq, vqgan_sha256,
                                                              clip_model, args.clip_sha256, args.out, args.workers,
                                                              stop, proc, args.hue_copies)
    # A few images stage 2 never trains on, for its sample grids: they show generalisation, not memory.
    preview, preview_emb = data.held_out_preview(images, embeddings, vq.cfg.image_size, args.hue_copies)
    raw_model, opt, scaler = prior_model(cfg, args, embeddings, n_train, ckpt, proc)
    # The wrapped model trains; raw_model is what checkpoints save.
    model = runtime.wrap_model(raw_model, args.compile, proc)
    if proc.master:
        kind = f"diffusion prior, {cfg.n_steps} steps, adaLN" if args.prior == "diffusion" else \
            f"GPT prior, {'prefix + adaLN' if cfg.adaln else 'prefix'}"
        print(f"{kind} conditioning: {runtime.millions(raw_model)}M params ({cfg.n_layer} layers, width "
              f"{cfg.n_embd}) | {n_train} training sequences of {cfg.n_tokens} tokens, {n_holdout} images held "
              f"out | CLIP {args.clip} ({cfg.clip_dim}-d) | global batch {batch} = {batch * cfg.n_tokens} "
              f"tokens/step | lr {args.prior_lr} | device {proc.device} x{proc.world} {proc.precision}")

    # The random state is restored last; with it the embedding loss last computed, which progress lines show.
    embed_loss = torch.zeros((), device=proc.device)
    if ckpt is not None:
        embed_loss.fill_(runtime.restore_process_state(ckpt["rng"], proc).get("embed", 0.0))
    # The signal handler (`stop`) was installed before the cache build, so that a signal there stops it too.
    guard, meter = runtime.NonFiniteGuard(proc.device, last_good=ckpt_path), runtime.Meter(start)
    per_rank = batch // proc.world
    step = start
    while step < args.prior_steps:
        # One optimizer update = grad_accum micro-batches of --batch-size sequences on each process.
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.prior_lr, args.warmup, args.prior_steps)
        # This rank's rows of the cache and its share of the step's random draws; both are functions of the
        # step alone (see data.batch_indices and step_randomness), like stage 1's images.
        rows, _ = data.batch_indices(n_train, per_rank, proc.rank, proc.world, args.seed, step)
        draws = step_randomness(args.seed, step, per_rank, cfg, args.cond_drop, proc)
        micro = micro_batches(tokens, embeddings, rows, draws, args.batch_size, proc.device)
        with_embed = args.embed_loss_weight > 0 and step % args.embed_loss_every == 0
        logs = prior_step(model, raw_model, opt, micro, args.embed_loss_batch if with_embed else 0, vq, clip_model,
                          args, proc.autocast(), scaler)
        guard.update(logs["loss"], step)
        # The embedding loss is computed every few steps; progress lines show the last one.
        embed_loss = logs["embed"] if with_embed else embed_loss
        step += 1

        if step % args.log_every == 0 or step == args.prior_steps:  # the one wait for the GPU, so rare
            guard.check()
            terms = {"vlb": logs["vlb"], "aux": logs["aux"]} if args.prior == "diffusion" else \
                {"ce": logs["ce"], "embed": embed_loss, **({"pred": logs["pred"]} if "pred" in logs else {})}
            shown = runtime.mean_over_ranks(terms, proc.device)
            if proc.master:
                print(f"step {step:>6}/{args.prior_steps} | {' '.join(f'{k} {v:.4f}' for k, v in shown.items())} | "
                      f"lr {lr_at(step - 1, args.prior_lr, args.warmup, args.prior_steps):.2e} | "
                      f"{meter.rate(step, batch * cfg.n_tokens):,.0f} tokens/s | "
                      f"eta {meter.eta(step, args.prior_steps)}", flush=True)
        stopping = stop.requested(step, proc.device)
        if step % args.save_every == 0 or step == args.prior_steps or stopping:
            guard.check()
            # The prior names the CLIP and the VQGAN (by its SHA-256) it was trained with: sample.py needs both.
            ckpt = runtime.checkpoint("prior", cfg, step, batch, args, proc, prior_type=args.prior,
                                      model=raw_model.state_dict(), optimizer=opt.state_dict(),
                                      scaler=scaler.state_dict(),
                                      rng_extra={"embed": embed_loss.item()}, clip=args.clip,
                                      vqgan=os.path.abspath(os.path.join(args.out, "vqgan.pt")),
                                      vqgan_sha256=vqgan_sha256)
            guard.last_good = runtime.save_checkpoint(ckpt, args.out, "prior", step, args.keep_checkpoints, proc,
                                                      lambda grid: runtime.save_prior_grid(raw_model, vq, preview,
                                                                                           preview_emb, grid, args.seed,
                                                                                           proc))
        if stopping:
            stop.exit(step, proc)
    if proc.master:
        print(f"stage 2 done: {os.path.join(args.out, 'prior.pt')}")


# -----------------------------------------------------------------------------------------------------------
# main: both stages in one process group. Under torchrun every process runs this, and they meet in the
# collective calls (gradient all-reduce, logging, checkpoints, barriers).


def main(argv=None):
    args = parse_args(argv)  # a bad command line stops here, before any process group or file exists
    proc = runtime.setup_distributed(args.device, args.precision)
    # The CLIP's identity, hashed once: checkpoints record it (with the other arguments) and the cache key uses it.
    args.clip_sha256 = runtime.clip_sha256(args.clip) if args.stage != "vqgan" else None
    # One run per folder; out of memory, or a dead process, as one line; the process group left on every path.
    with runtime.one_run(args.out, proc, args.batch_size, args.grad_accum):
        images, args.data_fingerprint = runtime.scan_data(args.data, args.out, proc, args.resume,
                                                          args.accept_changed_data)
        if args.stage in ("vqgan", "all"):
            train_vqgan(args, images, proc)
            # Stage 2 on other ranks reads the vqgan.pt that rank 0 has just written.
            runtime.barrier()
        if args.stage in ("prior", "all"):
            train_prior(args, images, proc)


if __name__ == "__main__":
    main()
