"""
clipgen.py: text to image with a trained CLIP-GEN run (CLIP-GEN section 3.3, inference).

The prior was trained to write an image's VQGAN tokens from that image's CLIP embedding. At inference the
CLIP *text* embedding of a prompt takes its place: the prior samples `n` candidate token grids, the VQGAN
decodes them, and CLIP reranks the candidates by image-text similarity, keeping the best `keep` (the
reranking DALL-E and CLIP-GEN both use). The prior is whichever train.py trained: CLIP-GEN's GPT
(prior.py) or CLIP-VQDiffusion's discrete diffusion model (diffusion.py); both sample the same way here.

    from clipgen import CLIPGen
    gen = CLIPGen.from_checkpoint("out")                    # out/vqgan.pt + out/prior.pt + their CLIP
    for image, score in gen.generate(["a dog"], n=16, keep=4, seed=0)[0]:
        image.save(f"dog_{score:.1f}.png")

`python sample.py "a dog"` does the same from the shell.
"""
import math
import os
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from PIL import Image

import clip_loader
import data
import diffusion
import prior
import runtime
import vqgan


# -----------------------------------------------------------------------------------------------------------
# Presets: every named size of the whole system, its three models and the training recipe that fits them,
# in one table. train.py --preset and bench.py --size take their choices from it; a flag a user gives
# overrides the recipe's value.


@dataclass(frozen=True)
class Preset:
    vqgan: vqgan.VQGANConfig
    prior: prior.PriorConfig  # vocab_size, n_tokens and clip_dim are set from the VQGAN and CLIP actually used
    diffusion: diffusion.DiffusionConfig  # likewise
    # The training recipe: what train.py's flags of these names mean when left out.
    batch_size: int  # images per process per step, both stages
    vqgan_steps: int
    vqgan_lr: float
    disc_start: int  # step at which the GAN starts; past vqgan_steps = no GAN
    prior_steps: int
    prior_lr: float
    perceptual: str  # "vgg" or "none"


RECIPE_FIELDS = [f.name for f in fields(Preset) if f.name not in ("vqgan", "prior", "diffusion")]

PRESETS = {
    # CLIP-GEN's sizes (256 px, 16x16 tokens of 16,384 codes, a 24-layer GPT) with taming's recipe; a GPU job.
    "paper": Preset(vqgan.VQGANConfig(), prior.PriorConfig(), diffusion.DiffusionConfig(),
                    batch_size=8, vqgan_steps=100_000, vqgan_lr=1e-4, disc_start=10_000, prior_steps=100_000,
                    prior_lr=3e-4, perceptual="vgg"),
    # 64 px for a CPU or a small GPU, both stages in about 30 minutes on 2 cores (the toy worlds, RESULTS.md).
    # A downsampling of 4 (16x16 tokens), not 16: an 8x8 grid blurs thin strokes into blobs. No attention in
    # the tokenizer: with it, the tokenizer ties colours to the shapes it saw them on and recolours unseen
    # combinations. No GAN: at this budget it swaps whole colours. Both priors the same size, so that they
    # can be compared at equal cost.
    "small": Preset(vqgan.VQGANConfig(image_size=64, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                      attn_resolutions=(), mid_attention=False, z_channels=64, codebook_size=256,
                                      codebook_dim=16, dead_code_steps=100, disc_channels=32, disc_layers=2),
                    prior.PriorConfig(n_layer=4, n_head=4, n_embd=128),
                    diffusion.DiffusionConfig(n_layer=4, n_head=4, n_embd=128),
                    batch_size=16, vqgan_steps=1200, vqgan_lr=5e-4, disc_start=100_000, prior_steps=2500,
                    prior_lr=1e-3, perceptual="none"),
    # For tests: 32 px, 8x8 tokens, a 128-entry codebook; taming's attention kept, so the tests cover it.
    "tiny": Preset(vqgan.VQGANConfig(image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                     attn_resolutions=(8,), z_channels=32, codebook_size=128, codebook_dim=8,
                                     dead_code_steps=50, disc_channels=16, disc_layers=2),
                   prior.PriorConfig(n_layer=2, n_head=2, n_embd=64),
                   diffusion.DiffusionConfig(n_layer=2, n_head=2, n_embd=64),
                   batch_size=8, vqgan_steps=2000, vqgan_lr=5e-4, disc_start=1000, prior_steps=2000, prior_lr=1e-3,
                   perceptual="none"),
}


class CLIPGen:
    """The three frozen models of a CLIP-GEN run, on one device."""

    def __init__(self, vqgan_model, prior_model, clip_model, device, precision="auto"):
        self.vqgan, self.prior, self.clip, self.device = vqgan_model, prior_model, clip_model, device
        self.precision = runtime.resolve_precision(precision, device)  # of sampling and decoding; CLIP runs in fp32
        self.autocast = runtime.autocast(device, self.precision)

    @classmethod
    def from_checkpoint(cls, run, clip=None, device=None, precision="auto"):
        """run: a run folder holding vqgan.pt and prior.pt, or a (vqgan_path, prior_path) pair.
        clip: the CLIP to use; by default the one the prior was trained with (named in prior.pt).
        precision: one of runtime.PRECISIONS (auto: bf16 on a GPU that has it, fp16 on one that does not, fp32
        on a CPU)."""
        vqgan_path, prior_path = (os.path.join(run, "vqgan.pt"), os.path.join(run, "prior.pt")) \
            if isinstance(run, (str, os.PathLike)) else run
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        prior_model, ckpt = load_prior(prior_path, device)
        vqgan_model, _ = vqgan.load_vqgan(vqgan_path, device)
        if clip_loader.sha256_of(vqgan_path) != ckpt["vqgan_sha256"]:
            warnings.warn(f"{vqgan_path} is not the VQGAN {prior_path} was trained with "
                          f"({ckpt['vqgan']}); images will not match what the prior meant")
        clip_model, _ = clip_loader.load(clip or ckpt["clip"], device=device)
        if clip_model.arch.embed_dim != prior_model.cfg.clip_dim:
            raise ValueError(f"CLIP {clip or ckpt['clip']!r} makes {clip_model.arch.embed_dim}-d embeddings but the "
                             f"prior was trained on {prior_model.cfg.clip_dim}-d ones (from {ckpt['clip']!r}); "
                             f"use that CLIP or one with the same embedding size")
        return cls(vqgan_model, prior_model, clip_model, device, precision)

    # ----- embeddings

    @torch.no_grad()
    def embed_text(self, prompts):
        """list of str -> (N, clip_dim) unit-norm CLIP text embeddings. Over-long prompts are truncated
        (with a warning) rather than refused: the end of a long prompt matters least to CLIP."""
        context = self.clip.arch.context_length
        for p in prompts:
            if len(clip_loader.default_tokenizer().encode(p)) + 2 > context:
                warnings.warn(f"prompt {p[:40]!r}... is longer than CLIP's {context} tokens; truncated")
        tokens = clip_loader.tokenize(prompts, context_length=context, truncate=True).to(self.device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images):
        """(B, 3, H, W) tensors in [-1, 1] -> (B, clip_dim) unit-norm CLIP image embeddings."""
        x = clip_loader.preprocess_tensor(images.to(self.device), self.clip.arch.image_resolution)
        return F.normalize(self.clip.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def embed_pil(self, pil_images):
        """PIL images -> (N, clip_dim), preprocessed exactly as OpenAI's CLIP expects."""
        preprocess = clip_loader.image_transform(self.clip.arch.image_resolution)
        x = torch.stack([preprocess(im) for im in pil_images]).to(self.device)
        return F.normalize(self.clip.encode_image(x).float(), dim=-1)

    # ----- sampling

    @torch.no_grad()
    def sample_images(self, embeddings, n, temperature=1.0, top_k=None, top_p=None, guidance=1.0, seed=0,
                      batch_size=32, progress=None, diffusion_steps=None):
        """(P, clip_dim) conditions -> (P, n, 3, H, W) images in [-1, 1]: n prior samples per condition,
        decoded by the VQGAN, in batches of `batch_size`. Each condition gets its own generator seeded with
        `seed`, so a prompt's images depend on the prompt, seed, n and batch size, not on the other prompts
        sampled with it. diffusion_steps: the diffusion prior's reverse steps (default: all it was trained
        with); the GPT writes one token per step and takes no such choice."""
        self.check_diffusion_steps(diffusion_steps)
        extra = {} if diffusion_steps is None else {"steps": diffusion_steps}
        side = math.isqrt(self.prior.cfg.n_tokens)
        total, done, results = len(embeddings) * n, 0, []
        for embedding in embeddings:
            generator = torch.Generator(self.device).manual_seed(seed)
            images = []
            for start in range(0, n, batch_size):
                if progress:
                    progress(done, total)
                rows = embedding.expand(min(batch_size, n - start), -1)  # (b, clip_dim)
                with self.autocast:
                    tokens = self.prior.sample(rows, temperature, top_k, top_p, guidance, generator, **extra)
                    images.append(self.vqgan.decode(tokens.view(-1, side, side)).float().clamp(-1, 1))
                done += len(rows)
            results.append(torch.cat(images))  # (n, 3, H, W)
        if progress:
            progress(total, total)
        return torch.stack(results)

    def check_diffusion_steps(self, steps):
        """Raise ValueError unless `steps` (None: all) is a number of reverse steps this run's prior takes."""
        if steps is None:
            return
        if not isinstance(self.prior, diffusion.DiffusionPrior):
            raise ValueError("the number of diffusion steps is a choice of the diffusion prior; this run's prior "
                             "is the GPT")
        self.prior.reverse_steps(steps)

    def rerank(self, images, targets, keep):
        """images (P, n, 3, H, W), targets (P, clip_dim) -> per condition, the `keep` images most similar
        to its target as [(PIL image, 100 * cosine)], best first."""
        results = []
        for candidates, target in zip(images, targets):
            scores = 100 * self.embed_images(candidates) @ target  # (n,)
            best = scores.argsort(descending=True)[:keep]
            results.append([(to_pil(candidates[i]), scores[i].item()) for i in best.tolist()])
        return results

    def generate(self, prompts, n=16, keep=4, temperature=1.0, top_k=None, top_p=None, guidance=1.0, seed=0,
                 batch_size=32, progress=None, diffusion_steps=None):
        """For each prompt: sample n images from its CLIP text embedding and return the `keep` with the
        highest CLIP score, as a list of (PIL image, score) pairs in descending score."""
        if keep > n:
            raise ValueError(f"keep ({keep}) can not exceed n ({n})")
        text = self.embed_text(list(prompts))
        images = self.sample_images(text, n, temperature, top_k, top_p, guidance, seed, batch_size, progress,
                                    diffusion_steps)
        return self.rerank(images, text, keep)

    def variations(self, image, n=16, keep=4, temperature=1.0, top_k=None, top_p=None, guidance=1.0, seed=0,
                   batch_size=32, progress=None, diffusion_steps=None):
        """Images like `image` (a PIL image): sampled from its CLIP image embedding, exactly what the prior
        was trained on, and ranked by CLIP similarity to it."""
        target = self.embed_pil([image])
        images = self.sample_images(target, n, temperature, top_k, top_p, guidance, seed, batch_size, progress,
                                    diffusion_steps)
        return self.rerank(images, target, keep)[0]

    def interpolation_embeddings(self, prompt_a, prompt_b, steps):
        """(steps, clip_dim): spherical interpolation (slerp) between the two prompts' unit embeddings,
        which stays on the unit sphere where CLIP embeddings live (a straight line would cut inside it)."""
        a, b = self.embed_text([prompt_a, prompt_b])
        omega = torch.arccos((a @ b).clamp(-1, 1))
        t = torch.linspace(0, 1, steps, device=a.device).unsqueeze(1)  # (steps, 1)
        if omega < 1e-6:  # (nearly) the same direction: slerp degenerates to a constant
            return a.expand(steps, -1).clone()
        return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

    def interpolate(self, prompt_a, prompt_b, steps=8, n=4, temperature=1.0, top_k=None, top_p=None,
                    guidance=1.0, seed=0, batch_size=32, progress=None, diffusion_steps=None):
        """A list of `steps` (PIL image, score) pairs morphing from prompt_a to prompt_b: at each point,
        the best of n samples by CLIP similarity to the interpolated embedding."""
        path = self.interpolation_embeddings(prompt_a, prompt_b, steps)
        images = self.sample_images(path, n, temperature, top_k, top_p, guidance, seed, batch_size, progress,
                                    diffusion_steps)
        return [best[0] for best in self.rerank(images, F.normalize(path, dim=-1), 1)]

    # ----- evaluation

    def evaluate(self, prompts, real_images_dir, results=None, n=4, keep=1, seed=0, **sampling):
        """CLIP score (100 x cosine of each kept image with its prompt, averaged) and the Frechet distance
        between CLIP image features of the generated images and of the images in `real_images_dir`.
        Both use whichever CLIP is loaded, so they compare runs that use the same CLIP; they are not
        comparable with published Inception-based FID numbers. `results`: the output of an earlier
        `generate(prompts, ...)` to score instead of generating anew."""
        real_refs, _ = data.readable_images(real_images_dir)
        if results is None:
            results = self.generate(prompts, n=n, keep=keep, seed=seed, **sampling)
        return self.score_results(results, self.embed_pil([data.open_rgb(r) for r in real_refs]))

    def score_results(self, results, real_features):
        """generate()'s results and (M, clip_dim) CLIP features of real images -> evaluate()'s metrics."""
        fake_features = self.embed_pil([im for per_prompt in results for im, _ in per_prompt])
        scores = [score for per_prompt in results for _, score in per_prompt]
        return {"clip_score": sum(scores) / len(scores), "frechet_distance": frechet_distance(fake_features, real_features),
                "n_generated": len(scores), "n_real": len(real_features)}


def load_prior(path, device="cpu"):
    """Whichever prior train.py wrote to `path` (its --prior): the GPT (prior.py) or the discrete diffusion
    model (diffusion.py). -> (model in eval mode, checkpoint dict)"""
    ckpt = data.load_checkpoint(path, "prior")
    return (diffusion if ckpt.get("prior_type") == "diffusion" else prior).from_checkpoint(ckpt, path, device)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the formula of FID (Heusel et al. 2017). The
    trace of the matrix square root is computed as the sum of sqrt-eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    which is symmetric, so no SciPy is needed. A covariance needs at least 2 rows per side, and is only a
    rough estimate with fewer rows than dimensions: compare runs at equal N."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 images per side (got {len(a)} generated and "
                         f"{len(b)} real); use more real images or more prompts")
    a, b = a.double().cpu(), b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    tr_sqrt = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt).item()


def to_pil(image):
    """(3, H, W) tensor in [-1, 1] -> 8-bit RGB PIL image."""
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
