"""
clipgen.py: text to image with a trained CLIP-GEN run (CLIP-GEN section 3.3, inference).

The prior was trained to write an image's VQGAN tokens from that image's CLIP embedding. At inference the
CLIP *text* embedding of a prompt takes its place: the prior samples `n` candidate token grids, the VQGAN
decodes them, and CLIP reranks the candidates by image-text similarity, keeping the best `keep` (the
reranking DALL-E and CLIP-GEN both use). The prior is whichever train.py trained: CLIP-GEN's GPT
(prior.py) or CLIP-VQDiffusion's discrete diffusion model (diffusion.py); both sample the same way here.

    from clipgen import CLIPGen
    gen = CLIPGen.from_checkpoint("out")                    # out/vqgan.pt + out/prior.pt + their CLIP
    for image, score in gen.generate(["a dog"], seed=0)[0]:   # the best KEEP of CANDIDATES samples
        image.save(f"dog_{score:.1f}.png")

`python sample.py "a dog"` does the same from the shell.
"""
import math
import os
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

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
    remove_mean: bool  # project the training images' mean embedding out of every condition (prior.without_mean)
    hue_copies: int  # stage 2 also trains on this many hue-rotated copies of every image (runtime.hue_copies_of)
    aux_loss_weight: float  # lambda of the diffusion prior's auxiliary x0 loss (diffusion.diffusion_loss)


RECIPE_FIELDS = [f.name for f in fields(Preset) if f.name not in ("vqgan", "prior", "diffusion")]

PRESETS = {
    # CLIP-GEN's sizes (256 px, 16x16 tokens of 16,384 codes, a 24-layer GPT) with taming's recipe; a GPU job.
    "paper": Preset(vqgan.VQGANConfig(), prior.PriorConfig(), diffusion.DiffusionConfig(),
                    batch_size=8, vqgan_steps=100_000, vqgan_lr=1e-4, disc_start=10_000, prior_steps=100_000,
                    prior_lr=3e-4, perceptual="vgg", remove_mean=False, hue_copies=0,
                    aux_loss_weight=diffusion.AUX_LOSS_WEIGHT),
    # 64 px for a CPU or a small GPU, both stages in about 30 minutes on 2 cores (the toy worlds, RESULTS.md).
    # A downsampling of 4 (16x16 tokens): an 8x8 grid draws the letters' shapes better, but its tokenizer loses
    # the textures' fine patterns, from 32-px images or with one more halving (RESULTS.md 1b.25). No attention
    # in the tokenizer: with it, the tokenizer ties colours to the shapes it saw them on and recolours unseen
    # combinations. No GAN: at this budget it swaps whole colours. Both priors the same size, so that they
    # can be compared at equal cost. Mean removal on: it closes most of both toy CLIPs' modality gap. One hue
    # copy of every image: the held-out combinations are drawn far more often on both worlds, at some cost to
    # the letters' seen ones; more copies cost the letters' colours. A peak learning rate of 2e-3 for the prior:
    # at 2,500 steps it fits the tokens better, and the textures' held-out combinations are drawn more often
    # without costing the letters (RESULTS.md 1b.28; the diffusion prior shares it, not measured there). The
    # diffusion prior's auxiliary loss at weight 1, not VQ-Diffusion's 5e-4: at 2,500 steps the bound alone
    # barely trains the clean-grid prediction at high t, where the layout is chosen (RESULTS.md 1.6).
    "small": Preset(vqgan.VQGANConfig(image_size=64, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                      attn_resolutions=(), mid_attention=False, z_channels=64, codebook_size=256,
                                      codebook_dim=16, dead_code_steps=100, disc_channels=32, disc_layers=2),
                    prior.PriorConfig(n_layer=4, n_head=4, n_embd=128),
                    diffusion.DiffusionConfig(n_layer=4, n_head=4, n_embd=128),
                    batch_size=16, vqgan_steps=1200, vqgan_lr=5e-4, disc_start=100_000, prior_steps=2500,
                    prior_lr=2e-3, perceptual="none", remove_mean=True, hue_copies=1, aux_loss_weight=1.0),
    # For tests: 32 px, 8x8 tokens, a 128-entry codebook; taming's attention and CLIP-GEN's conditioning
    # kept, so the tests cover them.
    "tiny": Preset(vqgan.VQGANConfig(image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                     attn_resolutions=(8,), z_channels=32, codebook_size=128, codebook_dim=8,
                                     dead_code_steps=50, disc_channels=16, disc_layers=2),
                   prior.PriorConfig(n_layer=2, n_head=2, n_embd=64),
                   diffusion.DiffusionConfig(n_layer=2, n_head=2, n_embd=64),
                   batch_size=8, vqgan_steps=2000, vqgan_lr=5e-4, disc_start=1000, prior_steps=2000, prior_lr=1e-3,
                   perceptual="none", remove_mean=False, hue_copies=0, aux_loss_weight=diffusion.AUX_LOSS_WEIGHT),
}


# Sampling defaults of CLIPGen.generate, sample.py and toyworld.py eval: CLIP keeps the best KEEP of CANDIDATES a
# prompt. More candidates give the reranker better odds of finding a held-out combination the prior draws only
# now and then (RESULTS.md 1b.14); the cost is linear in CANDIDATES. Classifier-free guidance GUIDANCE drew
# held-out prompts better on both toy worlds (1b.11); a prior that never learned the null condition gets 1.
# The GPT draws its tokens at TEMPERATURE < 1, which leaves out more of the unlikely ones: on the letters world
# it draws the asked shape more often, the textures level (1b.23). The diffusion prior keeps 1 (not measured).
# The diffusion prior takes DIFFUSION_STEPS of its T = 100 reverse steps, jumping between them with the exact
# q(x_s | x_t, x0) (VQ-Diffusion's fast inference): on both toy worlds all 100 drew no better, at 4x the time
# (RESULTS.md 1.6, 1.9).
CANDIDATES, KEEP, GUIDANCE, TEMPERATURE, DIFFUSION_STEPS = 64, 8, 2.0, 0.8, 25


class CLIPGen:
    """The three frozen models of a CLIP-GEN run, on one device."""

    def __init__(self, vqgan_model, prior_model, clip_model, device, precision="auto", null_trained=True):
        self.vqgan, self.prior, self.clip = vqgan_model, prior_model, clip_model
        # Whether the prior learned the null condition (train.py --cond-drop > 0), which guidance needs.
        self.null_trained = null_trained
        self.device = device = torch.device(device)  # "cpu" or "cuda:1" as well as a torch.device
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
        return cls(vqgan_model, prior_model, clip_model, device, precision, ckpt["args"]["cond_drop"] > 0)

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
    def sample_images(self, embeddings, n, temperature=None, top_k=None, top_p=None, guidance=None, seed=0,
                      batch_size=32, progress=None, diffusion_steps=None):
        """(P, clip_dim) conditions, or P tensors (parts, clip_dim) of prompts in parts (generate) -> (P, n, 3,
        H, W) images in [-1, 1]: n prior samples per condition,
        decoded by the VQGAN, in batches of `batch_size`. Each condition gets its own generator seeded with
        `seed`, so a prompt's images depend on the prompt, seed, n and batch size, not on the other prompts
        sampled with it. diffusion_steps: the diffusion prior's reverse steps (default: DIFFUSION_STEPS, or all
        it was trained with if fewer); the GPT writes one token per step and takes no such choice. guidance
        None: GUIDANCE where the prior learned the null condition, else 1. temperature None: TEMPERATURE for
        the GPT, 1 for diffusion."""
        self.check_diffusion_steps(diffusion_steps)
        is_diffusion = isinstance(self.prior, diffusion.DiffusionPrior)
        if diffusion_steps is None and is_diffusion:
            diffusion_steps = min(DIFFUSION_STEPS, self.prior.cfg.n_steps)
        if temperature is None:
            temperature = 1.0 if is_diffusion else TEMPERATURE
        if guidance is None:
            guidance = GUIDANCE if self.null_trained else 1.0
        in_parts = any(e.dim() == 2 and len(e) > 1 for e in embeddings)
        if (guidance != 1 or in_parts) and not self.null_trained:
            raise ValueError(f"this prior was trained with --cond-drop 0, so it never learned the null condition "
                             f"that guidance ({guidance}) and prompts in parts ('A AND B') contrast with; "
                             f"sample it with --guidance 1 and whole prompts")
        extra = {} if diffusion_steps is None else {"steps": diffusion_steps}
        side = math.isqrt(self.prior.cfg.n_tokens)
        total, done, results = len(embeddings) * n, 0, []
        for embedding in embeddings:
            generator = torch.Generator(self.device).manual_seed(seed)
            images = []
            for start in range(0, n, batch_size):
                if progress:
                    progress(done, total)
                rows = embedding.expand(min(batch_size, n - start), *embedding.shape)  # (b, [parts,] clip_dim)
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

    def generate(self, prompts, n=CANDIDATES, keep=KEEP, temperature=None, top_k=None, top_p=None, guidance=None,
                 seed=0, batch_size=32, progress=None, diffusion_steps=None):
        """For each prompt: sample n images from its CLIP text embedding and return the `keep` with the
        highest CLIP score, as a list of (PIL image, score) pairs in descending score.

        A prompt "A AND B" is drawn as the conjunction of its parts (composable guidance, prior.mix_guided),
        each part embedded alone, and ranked by similarity to the parts' mean embedding."""
        if keep > n:
            raise ValueError(f"keep ({keep}) can not exceed n ({n})")
        parts = [[part.strip() for part in prompt.split(" AND ")] for prompt in prompts]
        text = self.embed_text([part for prompt_parts in parts for part in prompt_parts])  # all parts at once
        if len(text) == len(parts):  # no prompt in parts
            conditions, targets = text, text
        else:
            conditions = list(text.split([len(p) for p in parts]))  # per prompt (parts, clip_dim)
            targets = torch.stack([F.normalize(c.mean(0), dim=0) for c in conditions])
        images = self.sample_images(conditions, n, temperature, top_k, top_p, guidance, seed, batch_size,
                                    progress, diffusion_steps)
        return self.rerank(images, targets, keep)

    def variations(self, image, n=CANDIDATES, keep=KEEP, temperature=None, top_k=None, top_p=None, guidance=None,
                   seed=0, batch_size=32, progress=None, diffusion_steps=None):
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

    def interpolate(self, prompt_a, prompt_b, steps=8, n=4, temperature=None, top_k=None, top_p=None,
                    guidance=None, seed=0, batch_size=32, progress=None, diffusion_steps=None):
        """A list of `steps` (PIL image, score) pairs morphing from prompt_a to prompt_b: at each point,
        the best of n samples by CLIP similarity to the interpolated embedding."""
        path = self.interpolation_embeddings(prompt_a, prompt_b, steps)
        images = self.sample_images(path, n, temperature, top_k, top_p, guidance, seed, batch_size, progress,
                                    diffusion_steps)
        return [best[0] for best in self.rerank(images, F.normalize(path, dim=-1), 1)]

    # ----- evaluation

    def evaluate(self, prompts, real_images_dir, results=None, n=4, keep=1, seed=0, fid=False, fid_blurs=(1, 2),
                 **sampling):
        """The kept images against their prompts and against the real images in `real_images_dir`:
        score_results()' CLIP scores and CLIP-feature Frechet distance (comparable only between runs that use
        the same CLIP) and, with fid, the FID papers report (Inception features; see fid_scores), and FID-k
        for each k in fid_blurs. `results`: the output of an earlier `generate(prompts, ...)` to score instead
        of generating anew."""
        real_refs, _ = data.readable_images(real_images_dir)
        if results is None:
            results = self.generate(prompts, n=n, keep=keep, seed=seed, **sampling)
        real = [data.open_rgb(r) for r in real_refs]
        metrics = self.score_results(results, self.embed_pil(real))
        if fid:
            metrics |= fid_scores([im for per_prompt in results for im, _ in per_prompt], real, fid_blurs, self.device)
        return metrics

    def score_results(self, results, real_features):
        """generate()'s results and (M, clip_dim) CLIP features of real images -> the CLIP score both ways
        papers report it: "clip_score", 100 x max(cos, 0) averaged over the kept images (LAFITE's, and
        torchmetrics'), "clip_cosine", the plain cosine, and "clip_cosine_best", the best candidate's cosine
        per prompt (best of N, as reranking keeps it); and the CLIP-feature Frechet distance to the real ones."""
        fake_features = self.embed_pil([im for per_prompt in results for im, _ in per_prompt])
        scores = [score for per_prompt in results for _, score in per_prompt]  # 100 x cosine, as rerank gives
        return {"clip_score": sum(max(s, 0) for s in scores) / len(scores),
                "clip_cosine": sum(scores) / len(scores) / 100,
                "clip_cosine_best": sum(per_prompt[0][1] for per_prompt in results) / len(results) / 100,
                "frechet_distance": frechet_distance(fake_features, real_features),
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


# -----------------------------------------------------------------------------------------------------------
# FID as the papers report it (Heusel et al. 2017): the Frechet distance between Inception-v3 pool3 features
# of generated and real images, computed with the weights of the TensorFlow graph the first FID code used,
# which every published number since has used too (CLIP-GEN, LAFITE, CogView; pytorch-fid ported them). That
# graph differs from torchvision's Inception-v3 in 1,008 classes, no auxiliary head, and the pooling of its
# mixed blocks: averages that leave the padding out, and a max in the last block.

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256 = "6726825d"  # the prefix of its SHA-256 that the file name carries


def _average_without_padding(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(InceptionA):
    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_average_without_padding(x))]


class _FIDInceptionC(InceptionC):
    def _forward(self, x):
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return [self.branch1x1(x), seven, double, self.branch_pool(_average_without_padding(x))]


class _FIDInceptionE(InceptionE):
    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        three, double = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1),
                torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1),
                self.branch_pool(self.pool(x))]


class FIDInception(Inception3):
    """The FID network: (B, 3, H, W) images in [0, 1] -> (B, 2048) pool3 features. Its state dict has
    torchvision's keys, so FID_WEIGHTS_URL's file loads with one strict load_state_dict."""

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (_FIDInceptionA(c, pool_features=p)
                                                       for c, p in ((192, 32), (256, 64), (288, 64)))
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (_FIDInceptionC(768, channels_7x7=c)
                                                                      for c in (128, 160, 160, 192))
        self.Mixed_7b = _FIDInceptionE(1280, _average_without_padding)
        self.Mixed_7c = _FIDInceptionE(2048, lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1))

    def forward(self, images):
        # The input as the FID code feeds it: bilinear to 299 x 299, then [0, 1] -> [-1, 1].
        x = 2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1  # (B, 3, 299, 299)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        return x.flatten(1)  # (B, 2048, 1, 1) -> (B, 2048)


def load_fid_inception(device="cpu", download_root=None):
    """The FID network with its weights (95 MB, downloaded once into clip_loader's cache folder, checked)."""
    path = clip_loader.download(FID_WEIGHTS_URL, clip_loader.cache_dir(download_root), FID_WEIGHTS_SHA256,
                                offline_hint=f"put it in {clip_loader.cache_dir(download_root)} (or $CLIPGEN_CACHE)")
    model = FIDInception()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(model, images, batch_size=50):
    """PIL images of any sizes -> (N, 2048) float64 pool3 features. Each image is resized to 299 x 299 on its
    own (as the FID code resizes a batch), so images of different sizes can share a batch."""
    device, features = next(model.parameters()).device, []
    for start in range(0, len(images), batch_size):
        x = torch.cat([F.interpolate(TF.to_tensor(im).unsqueeze(0), size=(299, 299), mode="bilinear",
                                     align_corners=False) for im in images[start:start + batch_size]])
        features.append(model(x.to(device)).double().cpu())
    return torch.cat(features)


def blurred(images, radius, size=256):
    """FID-k's inputs (CogView, CLIP-GEN): each image at size x size, blurred by PIL's Gaussian blur of
    `radius`, which leaves the global layout and takes away the fine detail low-resolution generators lack."""
    return [im.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(radius)) for im in images]


def fid_scores(fake, real, blurs=(1, 2), device="cpu", model=None):
    """Two lists of PIL images -> {"fid": FID, "fid_K": FID-K for each K in blurs}. A covariance over 2,048
    features needs many images to be stable: papers use 30,000 generated images (MS-COCO) or 50,000."""
    model = model or load_fid_inception(device)
    scores = {"fid": frechet_distance(inception_features(model, fake), inception_features(model, real))}
    for k in blurs:
        scores[f"fid_{k}"] = frechet_distance(inception_features(model, blurred(fake, k)),
                                              inception_features(model, blurred(real, k)))
    return scores


def to_pil(image):
    """(3, H, W) tensor in [-1, 1] -> 8-bit RGB PIL image."""
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
