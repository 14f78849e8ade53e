"""
vqgan.py: stage 1 of CLIP-GEN, the image tokenizer (CLIP-GEN section 3.1, which uses the VQGAN of
Esser et al. 2021, "Taming Transformers", arXiv 2012.09841).

An encoder turns a (3, 256, 256) image into a 16x16 grid of vectors, each vector is replaced by its nearest
entry in a learned codebook (so the image becomes 256 integer ids), and a decoder turns the codebook vectors
back into an image. It is trained with L1 + perceptual reconstruction losses, a patch-wise adversarial loss
and the codebook losses. Stage 2 models the ids with a GPT.

One change from taming's VQGAN fights codebook collapse (taming's 16384-entry codebook ends up using a small
fraction of its codes): codes are looked up in a low-dimensional projected space with l2-normalised vectors,
as in ViT-VQGAN (Yu et al. 2021, arXiv 2110.04627, section 3.2), and codes that go unused for a while are
re-initialised from recent encoder outputs.

    python train.py --data imgs/ --stage vqgan            # trains this model
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data


@dataclass
class VQGANConfig:
    image_size: int = 256  # training resolution; the networks are convolutional and accept any multiple of 16
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple = (1, 1, 2, 2, 4)  # 5 levels = 4 halvings: 256 px -> 16x16 tokens
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)  # feature-map sizes that get self-attention (only cheap ones)
    mid_attention: bool = True  # taming's attention block in the middle of encoder and decoder
    z_channels: int = 256  # width of the latent grid around the quantizer
    codebook_size: int = 16384
    codebook_dim: int = 32  # lookup space; ViT-VQGAN finds 32 uses codes far better than 256
    commitment_beta: float = 0.25  # weight of ||z - sg(q)||^2 (VQ-VAE, van den Oord et al. 2017, eq. 3)
    dead_code_steps: int = 200  # a code unused for this many training steps is re-initialised
    disc_channels: int = 64  # PatchGAN width
    disc_layers: int = 3  # PatchGAN depth: 3 gives 70x70-pixel patches
    perceptual_weight: float = 1.0
    gan_weight: float = 0.8  # taming's disc_weight, multiplied into the adaptive weight

    @property
    def downsample(self):
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def tokens_per_side(self):
        return self.image_size // self.downsample


def group_norm(channels):
    # 32 groups as in taming; fewer when a tiny model has fewer channels than that.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map; only used at low resolution
    (16x16 = 256 positions), where it lets the model relate distant parts of the image."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(2, 3)  # (B, 3, HW, C)
        y = F.scaled_dot_product_attention(qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3])  # (B, 1, HW, C)
        y = y.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        return x + self.proj(y)


def middle_attention(cfg, channels):
    return [AttnBlock(channels)] if cfg.mid_attention else []


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.channels * m for m in cfg.channel_mult]
        layers = [nn.Conv2d(3, chans[0], 3, padding=1)]
        res, cin = cfg.image_size, chans[0]
        for level, cout in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(cin, cout))
                cin = cout
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(cout))
            if level < len(chans) - 1:
                layers.append(nn.Conv2d(cout, cout, 3, stride=2, padding=1))  # halve the resolution
                res //= 2
        layers += [ResnetBlock(cin, cin), *middle_attention(cfg, cin), ResnetBlock(cin, cin),  # taming's "middle"
                   group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.z_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f); the mirror image of the encoder, one extra block per level."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.channels * m for m in cfg.channel_mult][::-1]
        cin, res = chans[0], cfg.tokens_per_side
        layers = [nn.Conv2d(cfg.z_channels, cin, 3, padding=1), ResnetBlock(cin, cin), *middle_attention(cfg, cin),
                  ResnetBlock(cin, cin)]
        for level, cout in enumerate(chans):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(cin, cout))
                cin = cout
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(cout))
            if level < len(chans) - 1:
                # Nearest-neighbour upsampling then a conv avoids the checkerboard of transposed convs.
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cout, cout, 3, padding=1)]
                res *= 2
        layers += [group_norm(cin), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)  # kept apart: the adaptive GAN weight reads its grads

    def forward(self, z):
        return self.conv_out(self.layers(z))


def full_precision(device):
    """A region where autocast is off (on devices that have autocast; the meta device has none)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def codebook_perplexity(ids, codebook_size):
    """exp(entropy) of the code histogram: the number of codes in effective use in this batch
    (equal to k when k codes are used equally often)."""
    ids = ids.flatten()
    p = torch.zeros(codebook_size, device=ids.device).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float))
    p = p / p.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup of each latent vector in a codebook, with the straight-through estimator.

    Lookups happen in a `codebook_dim`-dimensional space (a 1x1 conv projects down and back up) on
    l2-normalised vectors, so "nearest" means "highest cosine similarity": codes can not escape by growing
    in norm, and a low dimension makes each code win for a larger region (ViT-VQGAN, section 3.2).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.proj_in = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        self.proj_out = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        # Training steps since each code was last chosen; checkpointed, so usage survives a resume.
        self.register_buffer("code_age", torch.zeros(cfg.codebook_size, dtype=torch.long))
        # Uses of each code since the last call of restart_dead_codes (not checkpointed: always zero there).
        self.register_buffer("uses", torch.zeros(cfg.codebook_size, dtype=torch.long), persistent=False)
        self.recent_latents = None  # (N, d) detached latents of the last training batch: restart candidates

    def codes(self):
        return F.normalize(self.codebook.weight, dim=1)  # (K, d)

    def forward(self, z):  # (B, z_channels, h, w) -> quantized (B, z_channels, h, w), ids (B, h, w), loss
        B, _, h, w = z.shape
        # The latents that are looked up in fp32 even under autocast (a 1x1 conv, cheap): rounded to bf16's 8
        # bits of mantissa they would move by more than the gap between neighbouring codes.
        with full_precision(z.device):
            z = F.normalize(self.proj_in(z.float()), dim=1)  # (B, d, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, d)
        codes = self.codes().float()
        ids = self.nearest(flat, codes)
        q = codes[ids]  # (B*h*w, d)
        # Codebook loss pulls codes to the encoder outputs; commitment loss keeps the encoder near its codes.
        loss = F.mse_loss(q, flat.detach()) + self.cfg.commitment_beta * F.mse_loss(flat, q.detach())
        # Straight-through: the forward pass uses q, the backward pass copies q's gradient to the encoder.
        q = flat + (q - flat).detach()
        if self.training:
            self.uses.index_add_(0, ids, torch.ones_like(ids))  # unlike bincount, no wait for the GPU
            self.recent_latents = flat.detach()
        q = q.view(B, h, w, -1).permute(0, 3, 1, 2)  # (B*h*w, d) -> (B, d, h, w)
        return self.proj_out(q), ids.view(B, h, w), loss

    @staticmethod
    def nearest(flat, codes):
        """(N, d) unit latents, (K, d) unit codes -> (N,) index of the most similar code: for unit vectors the
        highest cosine is the smallest L2 distance. Always in fp32, autocast or not: in bf16 the cosines of
        neighbouring codes round to the same value and the argmax picks among them at random."""
        with full_precision(flat.device):
            return (flat.float() @ codes.float().t()).argmax(dim=1)

    def embed_ids(self, ids):  # (B, h, w) -> (B, z_channels, h, w)
        return self.proj_out(self.codes()[ids].permute(0, 3, 1, 2))

    def embed_probs(self, probs, h, w):  # (B, h*w, K) -> (B, z_channels, h, w): expected code vector
        q = probs.to(self.codebook.weight.dtype) @ self.codes()  # (B, h*w, K) @ (K, d) -> (B, h*w, d)
        return self.proj_out(q.transpose(1, 2).reshape(q.shape[0], -1, h, w))  # -> (B, d, h, w)

    @torch.no_grad()
    def restart_dead_codes(self, check=True):
        """Call once per optimizer step. Ages every code and, if `check`, re-initialises codes unused for
        `dead_code_steps` steps with encoder outputs of the latest batch, so that they land where the data
        is and start winning lookups. (Finding them waits for the GPU, so callers check every few steps.)
        Under DDP the uses are summed over ranks and rank 0's choice is broadcast, so every replica keeps
        the same codebook. Returns the number of codes restarted."""
        uses = self.uses.clone()
        if dist.is_initialized():
            dist.all_reduce(uses)
        self.code_age += 1
        self.code_age.masked_fill_(uses > 0, 0)
        self.uses.zero_()
        if not check:
            return 0
        dead = (self.code_age >= self.cfg.dead_code_steps).nonzero().squeeze(1)  # same on every rank
        if len(dead) == 0 or self.recent_latents is None:
            return 0
        pick = torch.randint(len(self.recent_latents), (len(dead),), device=dead.device)
        fresh = self.recent_latents[pick].to(self.codebook.weight.dtype)  # (n_dead, d), unit vectors
        if dist.is_initialized():
            dist.broadcast(fresh, src=0)
        self.codebook.weight[dead] = fresh
        self.code_age[dead] = 0
        return len(dead)

    def usage(self, window):
        """Fraction of codes chosen at least once in the last `window` training steps."""
        return (self.code_age < window).float().mean().item()


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, images):  # (B, 3, H, W) in [-1, 1] -> reconstruction, ids (B, H/f, W/f), codebook loss
        quantized, ids, codebook_loss = self.quantizer(self.encoder(images))
        return self.decoder(quantized), ids, codebook_loss

    @torch.no_grad()
    def encode(self, images):  # (B, 3, H, W) in [-1, 1] -> token ids (B, H/f, W/f)
        return self.quantizer(self.encoder(images))[1]

    def decode(self, ids):  # (B, h, w) token ids -> (B, 3, h*f, w*f) images, roughly in [-1, 1]
        return self.decoder(self.quantizer.embed_ids(ids))

    def decode_soft(self, probs):
        """(B, h*w, K) distributions over codes -> (B, 3, h*f, w*f) images, differentiable in `probs`.
        Each position gets the probability-weighted mix of code vectors; for one-hot `probs` this equals
        `decode`. Stage 2 backpropagates its embedding-reconstruction loss through this."""
        side = math.isqrt(probs.shape[1])  # square grids only, as everywhere in clipgen
        return self.decoder(self.quantizer.embed_probs(probs, side, side))


# -----------------------------------------------------------------------------------------------------------
# Losses (taming section 3.1, eq. 4-7): L1 + perceptual reconstruction, PatchGAN hinge loss with an adaptive
# weight, codebook losses.

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a conv net whose output is a grid of real/fake logits, one per
    overlapping image patch, which judges local texture, the part L1 and perceptual losses blur.
    GroupNorm replaces taming's BatchNorm so the result does not depend on how a batch is split over GPUs."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.disc_channels
        layers = [nn.Conv2d(3, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        cin = c
        for n in range(1, cfg.disc_layers + 1):
            cout = c * min(2 ** n, 8)
            stride = 2 if n < cfg.disc_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=False), group_norm(cout),
                       nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images):  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.layers(images)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance (Zhang et al. 2018) on the five ReLU stages of torchvision's ImageNet VGG16:
    features are l2-normalised over channels, and the squared differences are averaged over positions and
    summed over channels and stages. LPIPS additionally learns per-channel weights on top; we use them all
    equal, which needs no download beyond torchvision's VGG16."""

    STAGE_ENDS = (4, 9, 16, 23, 30)  # vgg16.features indices just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, vgg_features=None):
        super().__init__()
        if vgg_features is None:
            vgg_features = load_vgg16_features()
        self.stages = nn.ModuleList(vgg_features[a:b] for a, b in zip((0,) + self.STAGE_ENDS, self.STAGE_ENDS))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode=True):  # always frozen, whatever the caller's .train() says
        return super().train(False)

    def forward(self, x, y):  # two (B, 3, H, W) batches in [-1, 1] -> scalar
        h = torch.cat([x, y]) * 0.5 + 0.5
        h = (h - self.mean) / self.std  # ImageNet normalisation, as VGG16 was trained
        loss = 0.0
        for stage in self.stages:
            h = stage(h)
            fx, fy = F.normalize(h, dim=1).chunk(2)
            loss = loss + (fx - fy).pow(2).sum(dim=1).mean()
        return loss


def load_vgg16_features():
    """torchvision's ImageNet VGG16 conv layers (downloaded once into torch's hub cache)."""
    from torchvision.models import VGG16_Weights, vgg16
    try:
        return vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features
    except Exception as e:  # URLError, SSL errors, a corrupt cache: all mean "no weights"
        raise RuntimeError(f"could not load torchvision's VGG16 weights for the perceptual loss ({e}). "
                           "Offline? Copy vgg16-397923af.pth into ~/.cache/torch/hub/checkpoints/, or train "
                           "without it: --perceptual none") from None


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss (taming eq. 7 uses this form): push real logits above +1, fake below -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_gan_weight(rec_loss, gan_loss, last_layer):
    """Taming eq. 7: lambda = |grad_L(rec)| / (|grad_L(gan)| + 1e-4), gradients taken at the decoder's last
    layer L, so the adversarial term never drowns out (or vanishes next to) the reconstruction term."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


def generator_loss(images, recon, codebook_loss, fake_logits, last_layer, cfg, perceptual=None):
    """The objective of the encoder, codebook and decoder (taming eq. 4-6):

        L = |x - x_hat|_1 + w_p * d_VGG(x, x_hat) + L_codebook + lambda * gan_weight * (-mean D(x_hat))

    with lambda the adaptive weight of eq. 7 and -mean D(x_hat) the hinge loss's generator side.
    fake_logits: D(x_hat) from a frozen discriminator, or None before --disc-start (no adversarial term).
    Returns the loss and a dict of its detached parts for logging."""
    rec_loss = (recon.float() - images.float()).abs().mean()
    if perceptual is not None:
        rec_loss = rec_loss + cfg.perceptual_weight * perceptual(recon.float(), images.float())
    zero = torch.zeros((), device=images.device)
    gan_loss, weight = zero, zero
    if fake_logits is not None:
        gan_loss = -fake_logits.float().mean()
        weight = cfg.gan_weight * adaptive_gan_weight(rec_loss, gan_loss, last_layer)
    loss = rec_loss + weight * gan_loss + codebook_loss
    parts = {"loss": loss, "rec": rec_loss, "codebook": codebook_loss, "gan": gan_loss, "gan_weight": weight}
    return loss, {k: v.detach() for k, v in parts.items()}


def psnr(reconstruction, images):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (so the peak-to-peak range is 2)."""
    mse = F.mse_loss(reconstruction.float().clamp(-1, 1), images.float())
    return 10 * torch.log10(4 / mse)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints, written by train.py.

def load_vqgan(path, device="cpu"):
    """A VQGAN rebuilt from its self-describing checkpoint, in eval mode, and the checkpoint dict."""
    ckpt = data.load_checkpoint(path, "vqgan")
    model = VQGAN(VQGANConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
