"""
bench.py: how fast clipgen trains and samples on this machine (a benchmark, not a test).

    python bench.py                          # paper-size models on a GPU, tiny ones on a CPU
    python bench.py --size paper --compile --json bench.json

Measures, for a named model size:
  (a) the VQGAN training step (generator + discriminator, perceptual loss included) in images/s, with the
      project's speed settings (channels_last, and bf16 autocast on CUDA) and, on CUDA, also in plain fp32
      with the default memory layout, to show what those settings buy;
  (b) the prior training step in tokens/s and model FLOPs utilisation (MFU): model FLOPs per second over
      the device's peak (the published dense bf16 peak on H100/H200; a measured fp32 matmul peak on a CPU);
  (c) sampling n_tokens tokens with and without the KV cache, in images/s, and their ratio;
  (d) the same two for the discrete diffusion prior (diffusion.py) of the same size: its training step,
      and sampling with a quarter of its steps.
With --peers it times instead the shapes of the projects we compare with (taming-transformers' f16 VQGAN
at 256 px, batch 1, 1,024 codes, no perceptual loss; a GPT-2-small-sized prior, 12 layers x 768 over 257
positions and 1,024 tokens, as nanoGPT would train it, at batch 2 and 8) and batch-1 KV-cache sampling
against its ceiling: every weight is read once per token, so memory bandwidth bounds tokens/s.
Weights are random (speed does not depend on them) and nothing is downloaded.
"""
import argparse
import json
import math
import time
from dataclasses import replace

import torch
from torchvision.models import vgg16

import diffusion
import prior
import runtime
import vqgan
from clipgen import DIFFUSION_STEPS, PRESETS

# The peers' shapes (--peers): taming's vqgan_imagenet_f16_1024 and GPT-2 small over one image's tokens.
PEER_VQGAN = replace(PRESETS["paper"].vqgan, codebook_size=1024)
PEER_PRIOR = prior.PriorConfig(vocab_size=1024, n_tokens=256, n_layer=12, n_head=12, n_embd=768)
# A small shape at which nanoGPT's own training step is timed beside ours (RESULTS.md): 4 layers x 256, 64 tokens
# after the prefix, a 512-entry vocabulary and a 512-d condition.
SMALL_PEER_PRIOR = prior.PriorConfig(vocab_size=512, n_tokens=64, n_layer=4, n_head=4, n_embd=256, clip_dim=512)

# Published dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak(device):
    """-> (peak FLOP/s, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"published bf16 dense peak of {name}"
        return float("nan"), f"unknown peak for {name}"
    # A CPU has no published "peak" comparable to a GPU's; the best a large fp32 matmul reaches on this
    # machine is the honest ceiling for our model's matmuls.
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0), "measured fp32 1024^3 matmul"


def timed(fn, device, warmup, iters):
    """Seconds per call of fn after `warmup` untimed calls (compilation, autotuning, allocator).
    CUDA kernels run asynchronously: without a synchronize before reading the clock we would time only
    the kernel launches."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def matvec_bandwidth(device, n=8192):
    """Bytes/s that a large fp32 matrix-vector product reads: the most batch-1 sampling can reach, since
    it reads every weight once per token and does two FLOPs with it."""
    W, v = torch.randn(n, n, device=device), torch.randn(n, device=device)
    return W.numel() * W.element_size() / timed(lambda: W @ v, device, warmup=3, iters=20)


def weights_read_per_token(model):
    """Bytes of the weights one sampling step reads: every block, the final norm and the output head (one
    row of the token embedding and the prefix projection, read once, are left out)."""
    parts = [*model.blocks.parameters(), *model.ln_f.parameters(), *model.head.parameters()]
    return sum(p.numel() * p.element_size() for p in parts)


def vqgan_step(cfg, batch, device, precision, compile_model=False, fast=True, perceptual=True, seed=0):
    """train.py's stage-1 step with the adversarial loss on (the same losses, vqgan.py; one micro-batch, no
    DDP) on random images, from seed-`seed` weights: -> a function that takes one step and returns the
    generator's loss. fast: train.py's memory layout (channels_last); autocast in `precision`."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if fast else torch.contiguous_format
    autocast = runtime.autocast(device, precision)
    model = vqgan.VQGAN(cfg).to(device, memory_format=fmt)
    disc = vqgan.PatchDiscriminator(cfg).to(device, memory_format=fmt)
    # Random VGG16 weights: the same FLOPs as the real perceptual loss, without a 528 MB download.
    perceptual = vqgan.PerceptualLoss(vgg16(weights=None).features).to(device, memory_format=fmt) \
        if perceptual else None
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, fused=True)
    # One process, so no DDP; the adaptive GAN weight differentiates the loss twice, as in train.py.
    wrapped = runtime.wrap_model(model, compile_model, runtime.Process(0, 1, device), double_backward=True)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device).mul(2).sub(1)
    images = images.contiguous(memory_format=fmt)

    def step():
        opt_g.zero_grad(set_to_none=True)
        disc.requires_grad_(False)
        with autocast:
            recon, _, codebook_loss = wrapped(images)
            loss, _ = vqgan.generator_loss(images, recon, codebook_loss, disc(recon), model.decoder.conv_out.weight,
                                           cfg, perceptual)
        loss.backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        disc.requires_grad_(True)
        with autocast:
            d_loss = vqgan.hinge_d_loss(disc(images).float(), disc(recon.detach()).float())
        d_loss.backward()
        opt_d.step()
        return loss.detach()
    return step


def bench_vqgan(cfg, batch, device, fast, compile_model, warmup, iters, perceptual=True, precision="fp32"):
    """Images/s of one full stage-1 step (see vqgan_step)."""
    step = vqgan_step(cfg, batch, device, precision if fast else "fp32", compile_model, fast, perceptual)
    return batch / timed(step, device, warmup, iters)


def prior_flops_per_token(cfg):
    """Training FLOPs per token, PaLM's estimate as in nanoGPT: 6 x (non-embedding parameters) for the
    matmuls forward and backward, plus 12 x layers x width x sequence length for attention."""
    model_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.n_embd * cfg.vocab_size  # blocks + output head
    T = getattr(cfg, "n_prefix", 0) + cfg.n_tokens  # the diffusion prior has no prefix
    return 6 * model_params + 12 * cfg.n_layer * cfg.n_embd * T


def prior_step(cfg, batch, device, precision, compile_model=False, grad_clip=0.0, seed=0):
    """train.py's stage-2 step for either prior (a PriorConfig or a DiffusionConfig) on random tokens, from
    seed-`seed` weights: the GPT's cross-entropy step (the embedding loss runs only every few steps in
    training), or the diffusion prior's (grids corrupted at random steps, then diffusion_loss); AdamW, and
    gradient clipping if grad_clip > 0. -> a function that takes one step and returns the loss."""
    torch.manual_seed(seed)
    is_diffusion = isinstance(cfg, diffusion.DiffusionConfig)
    model = (diffusion.DiffusionPrior if is_diffusion else prior.Prior)(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    wrapped = runtime.wrap_model(model, compile_model, runtime.Process(0, 1, device))
    autocast = runtime.autocast(device, precision)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.n_tokens), device=device)
    emb = torch.randn(batch, cfg.clip_dim, device=device)
    drop = torch.zeros(batch, dtype=torch.bool, device=device)
    if is_diffusion:
        t = torch.randint(1, cfg.n_steps + 1, (batch,), device=device)
        x_t = model.schedule.corrupt(tokens, t, torch.rand(tokens.shape, device=device),
                                     torch.randint_like(tokens, cfg.vocab_size))

    def step():
        with autocast:
            if is_diffusion:
                loss = diffusion.diffusion_loss(wrapped(emb, x_t, t, drop), tokens, x_t, t, model.schedule,
                                                diffusion.AUX_LOSS_WEIGHT)[0]
            else:
                loss = prior.clipgen_loss(wrapped(emb, tokens[:, :-1], drop), tokens, emb, drop)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return loss.detach()
    return step


def bench_prior_train(cfg, batch, device, compile_model, warmup, iters, precision="fp32", grad_clip=0.0):
    """Tokens/s of the stage-2 step (see prior_step)."""
    step = prior_step(cfg, batch, device, precision, compile_model, grad_clip)
    return batch * cfg.n_tokens / timed(step, device, warmup, iters)


def bench_sampling(cfg, batch, device, iters, precision="fp32", **options):
    """Images/s of sampling `batch` grids at once from either prior with random weights: the GPT as load_prior
    sets it up (options: use_cache), or the diffusion prior (options: steps)."""
    torch.manual_seed(0)
    if isinstance(cfg, diffusion.DiffusionConfig):
        model, options = diffusion.DiffusionPrior(cfg).to(device).eval(), {"top_p": 0.85, **options}
    else:
        model, options = prior.Prior(cfg).to(device).eval().use_matvec_layout(), {"top_k": 100, **options}
    emb = torch.randn(batch, cfg.clip_dim, device=device)
    autocast = runtime.autocast(device, precision)

    def run():
        with autocast:
            model.sample(emb, **options)
    return batch / timed(run, device, warmup=1, iters=iters)


def size_rows(args, device, vq_cfg, prior_cfg, diff_cfg, vq_batch, prior_batch, peak, warmup):
    """The project at one --size, with its speed settings in args.precision."""
    rows, p = [], args.precision
    fast = bench_vqgan(vq_cfg, vq_batch, device, True, args.compile, warmup, args.iters, precision=p)
    rows.append((f"vqgan train step ({p}, channels_last)", f"{fast:.1f} img/s", ""))
    if device.type == "cuda":
        slow = bench_vqgan(vq_cfg, vq_batch, device, False, False, 2, args.iters)
        rows.append(("vqgan train step (fp32, default layout, no compile)", f"{slow:.1f} img/s",
                     f"speed-up {fast / slow:.2f}x"))
    tok_s = bench_prior_train(prior_cfg, prior_batch, device, args.compile, warmup, args.iters, p)
    mfu = tok_s * prior_flops_per_token(prior_cfg) / peak
    rows.append(("prior train step", f"{tok_s:,.0f} tokens/s", f"MFU {mfu:.1%}"))
    # Without the cache every new token re-runs the whole prefix (O(T^2) work for T tokens); with it, one
    # position per step attends to stored keys and values (O(T)).
    cached = bench_sampling(prior_cfg, args.sample_batch, device, iters=2, precision=p, use_cache=True)
    full = bench_sampling(prior_cfg, args.sample_batch, device, iters=1, precision=p, use_cache=False)
    rows.append((f"sample {prior_cfg.n_tokens} tokens, KV cache", f"{cached:.2f} img/s",
                 f"{cached / full:.1f}x faster"))
    rows.append((f"sample {prior_cfg.n_tokens} tokens, full recompute", f"{full:.2f} img/s", ""))
    # The discrete diffusion prior at the same size: no KV cache (every step sees the whole grid), but a
    # fixed number of steps whatever the grid's size.
    tok_s = bench_prior_train(diff_cfg, prior_batch, device, args.compile, warmup, args.iters, p)
    rows.append(("diffusion prior train step", f"{tok_s:,.0f} tokens/s",
                 f"MFU {tok_s * prior_flops_per_token(diff_cfg) / peak:.1%}"))
    # sample.py's default number of reverse steps (all 100 take about 4x as long).
    img_s = bench_sampling(diff_cfg, args.sample_batch, device, iters=1, precision=p, steps=DIFFUSION_STEPS)
    rows.append((f"diffusion prior, sample with {DIFFUSION_STEPS} of {diff_cfg.n_steps} steps",
                 f"{img_s:.2f} img/s", ""))
    return rows


def peer_rows(device, iters):
    """The project at the peers' shapes, with train.py's settings but uncompiled, in fp32."""
    vq_s = 1 / bench_vqgan(PEER_VQGAN, 1, device, True, False, 1, max(1, iters // 5), perceptual=False)
    rows = [("vqgan train step, taming f16 shape (256 px, batch 1, no perceptual)", f"{vq_s:.2f} s/img", "")]
    for batch in (2, 8):
        tok_s = bench_prior_train(PEER_PRIOR, batch, device, False, 2, iters)
        rows.append((f"prior train step, GPT-2 small shape, batch {batch}", f"{tok_s:,.0f} tokens/s",
                     f"{batch * PEER_PRIOR.n_tokens / tok_s * 1e3:.0f} ms/step"))
    # nanoGPT's own model and step at a small shape, timed beside this row (RESULTS.md): grad clip 1.0 as theirs.
    tok_s = bench_prior_train(SMALL_PEER_PRIOR, 16, device, False, 3, iters, grad_clip=1.0)
    rows.append(("prior train step, 4 x 256, 64 tokens + prefix, vocabulary 512, batch 16", f"{tok_s:,.0f} tokens/s",
                 f"{16 * SMALL_PEER_PRIOR.n_tokens / tok_s * 1e3:.0f} ms/step"))
    ceiling = matvec_bandwidth(device) / weights_read_per_token(prior.Prior(PEER_PRIOR))
    for batch in (1, 8):
        tok_s = bench_sampling(PEER_PRIOR, batch, device, iters=2, use_cache=True) * PEER_PRIOR.n_tokens
        note = f"{tok_s / ceiling:.0%} of the weight-bandwidth ceiling, {ceiling:.1f} tokens/s" if batch == 1 else ""
        rows.append((f"sample 256 tokens, KV cache, batch {batch}", f"{tok_s:.1f} tokens/s", note))
    return rows


def peak_memory(device):
    """Peak memory allocated on a GPU since the last reset, in GB (nan on a CPU, which has no such counter)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def track(make_step, device, steps, compile_model):
    """The same training run (the same weights, data and steps) in fp32 and in bf16, eager and, with
    compile_model, compiled: -> {variant: (losses, seconds per step after the first, peak GB)}."""
    runs = {}
    variants = [("fp32", False), ("bf16", False)] + [("bf16", True)] * compile_model
    for precision, compiled in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = make_step(precision, compiled)
        losses = [step().float().item()]  # the first step compiles, and is not timed
        seconds = timed(lambda: losses.append(step().float().item()), device, 0, steps - 1)
        runs[f"{precision} {'compiled' if compiled else 'eager'}"] = (losses, seconds, peak_memory(device))
    return runs


def gpu_check(device, size, steps, compile_model, peak):
    """Every CUDA-only path at once, for the developer who is lent a GPU for a few minutes: stage 1 and both
    priors at `size`'s shapes for `steps` steps in fp32, bf16 and bf16 compiled (fused Adam), then
    KV-cache sampling in bf16. -> rows of throughput, MFU, peak memory, and how far bf16's losses are from
    fp32's (relative; compiled against eager too). On a CPU (--device cpu) it is a dry run of the same code."""
    cfg, gpu = PRESETS[size], device.type == "cuda"
    vq_batch, batch = (8, 32) if size == "paper" else (4, 8)
    # The priors model the VQGAN's own tokens: at the paper's size a 16x16 grid of 16,384 codes.
    n, sizes = cfg.vqgan.tokens_per_side ** 2, dict(n_tokens=cfg.vqgan.tokens_per_side ** 2,
                                                    vocab_size=cfg.vqgan.codebook_size)
    prior_cfg, diff_cfg = replace(cfg.prior, **sizes), replace(cfg.diffusion, **sizes)
    # A CPU dry run leaves out the perceptual network: VGG16 in bf16 is slow on a CPU and adds no code path.
    parts = [("stage 1, VQGAN + discriminator", vq_batch, "img/s", None,
              lambda p, c: vqgan_step(cfg.vqgan, vq_batch, device, p, c, perceptual=gpu)),
             ("stage 2, GPT prior", batch * n, "tokens/s", prior_cfg,
              lambda p, c: prior_step(prior_cfg, batch, device, p, c, grad_clip=1.0)),
             ("stage 2, diffusion prior", batch * n, "tokens/s", diff_cfg,
              lambda p, c: prior_step(diff_cfg, batch, device, p, c, grad_clip=1.0))]
    rows = []
    for name, units, unit, flops_cfg, make_step in parts:
        runs = track(make_step, device, steps, compile_model)
        reference = runs["fp32 eager"][0]
        for variant, (losses, seconds, memory) in runs.items():
            drift = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(reference, losses))
            mfu = f", MFU {units / seconds * prior_flops_per_token(flops_cfg) / peak:.1%}" if flops_cfg else ""
            rows.append((f"{name}, {variant}", f"{units / seconds:,.1f} {unit}",
                         f"loss {losses[-1]:.4f}, {drift:.1%} from fp32{mfu}"
                         + ("" if math.isnan(memory) else f", peak {memory:.1f} GB")))
    for sequences in (1, 8):
        tok_s = bench_sampling(prior_cfg, sequences, device, iters=1, precision="bf16", use_cache=True) * n
        rows.append((f"sample {n} tokens, KV cache, bf16, batch {sequences}", f"{tok_s:,.1f} tokens/s", ""))
    return rows


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=runtime.HelpFormatter)
    p.add_argument("--size", choices=list(PRESETS), help="model size, a preset (default: paper on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                   help="of the timed steps: 'auto' is bf16 on a GPU that has it, fp16 on one that does not, fp32 on "
                        "a CPU")
    p.add_argument("--vqgan-batch", type=runtime.at_least(1), help="images per VQGAN step (default: 8 paper, 4 others)")
    p.add_argument("--prior-batch", type=runtime.at_least(1),
                   help="sequences per prior step (default: 32 paper, 8 others)")
    p.add_argument("--sample-batch", type=runtime.at_least(1), default=8, help="sequences sampled at once")
    p.add_argument("--iters", type=runtime.at_least(2), default=10,
                   help="timed iterations of each training step (--gpu-check: steps of each run)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (--gpu-check: also compiled)")
    p.add_argument("--peers", action="store_true",
                   help="time the peers' shapes (taming's f16 VQGAN, GPT-2-small and nanoGPT-small priors) instead "
                        "of --size")
    p.add_argument("--gpu-check", action="store_true",
                   help="run every CUDA path once, fp32 against bf16, eager and (with --compile) compiled, and print "
                        "speed, MFU, peak memory and how far bf16's losses are from fp32's")
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    args.precision = runtime.resolve_precision(args.precision, device)
    size = args.size or ("paper" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    vq_cfg = PRESETS[size].vqgan
    # The priors always write a 16x16 = 256-token grid here, the paper's sequence length.
    prior_cfg, diff_cfg = replace(PRESETS[size].prior, n_tokens=256), replace(PRESETS[size].diffusion, n_tokens=256)
    vq_batch = args.vqgan_batch or (8 if size == "paper" else 4)
    prior_batch = args.prior_batch or (32 if size == "paper" else 8)
    peak, peak_source = device_peak(device)
    warmup = 5 if args.compile else 2

    # Each row: (what, value, note); printed as a table and optionally written as JSON.
    if args.gpu_check:
        rows = gpu_check(device, size, args.iters, args.compile, peak)
    elif args.peers:
        rows = peer_rows(device, args.iters)
    else:
        rows = size_rows(args, device, vq_cfg, prior_cfg, diff_cfg, vq_batch, prior_batch, peak, warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name} | {'peer shapes' if args.peers else 'size ' + size} | torch {torch.__version__} | "
          f"compile {args.compile} | {args.precision} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    if not (args.peers or args.gpu_check):
        print(f"VQGAN {sum(p.numel() for p in vqgan.VQGAN(vq_cfg).parameters()) / 1e6:.1f}M params at "
              f"{vq_cfg.image_size}px, batch {vq_batch} | prior {prior_cfg.n_layer} layers x {prior_cfg.n_embd}, "
              f"batch {prior_batch} x {prior_cfg.n_tokens} tokens, {prior_flops_per_token(prior_cfg) / 1e9:.2f} "
              f"GFLOP/token | diffusion prior the same size, {diff_cfg.n_steps} steps")
    width = max(len(r[0]) for r in rows)
    for what, value, note in rows:
        print(f"  {what:<{width}}  {value:>18}  {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "size": size, "compile": args.compile, "precision": args.precision,
                       "peak_flops": peak, "results": [dict(zip(("what", "value", "note"), r)) for r in rows]},
                      f, indent=2)
    return rows


if __name__ == "__main__":
    main()
