"""
diffusion.py: the second prior, CLIP-VQDiffusion's (Han & Kim 2024, arXiv 2403.14944): a discrete diffusion model
over the same VQGAN tokens as the GPT prior (prior.py), conditioned on the same CLIP embedding.

Where the GPT writes the 16x16 token grid one token at a time in raster order, this model starts from a grid
of [MASK] tokens and denoises all positions together over T steps, each step seeing the whole grid (VQ-Diffusion,
Gu et al. 2022, arXiv 2111.14822). Its forward process is "mask-and-replace": at every step a token stays, is
replaced by a uniformly random code, or becomes [MASK], which it never leaves. The network is a bidirectional
transformer that predicts the clean grid x0 from the noisy one x_t (the paper's reparameterisation); the
reverse step p(x_{t-1} | x_t) is that prediction pushed through the forward process's exact posterior. The
timestep and the CLIP embedding each enter through an adaptive LayerNorm (CLIP-VQDiffusion's conditioning,
in place of VQ-Diffusion's cross-attention to text); guidance, pseudo-text noise and --remove-mean are
shared with the GPT prior.

    python train.py --data imgs/ --prior diffusion        # trains this model instead of the GPT on out/vqgan.pt
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import prior


@dataclass
class DiffusionConfig:
    vocab_size: int = 16384  # = the VQGAN's codebook size K; [MASK] is token id K
    n_tokens: int = 256  # a 16x16 grid
    n_layer: int = 24  # CLIP-VQDiffusion's transformer: 24 layers of width 512 with 16 heads
    n_head: int = 16
    n_embd: int = 512
    clip_dim: int = 512
    n_steps: int = 100  # T, the diffusion steps trained (sampling may take fewer)
    remove_mean: bool = False  # as in PriorConfig
    gelu: str = "none"  # as in PriorConfig
    dropout: float = 0.0

    @property
    def head_size(self):
        return self.n_embd // self.n_head


AUX_LOSS_WEIGHT = 5e-4  # lambda of the auxiliary x0 loss in VQ-Diffusion's released configs (the paper preset's)

class Schedule(nn.Module):
    """VQ-Diffusion's linear mask-and-replace schedule, and the two distributions everything else is built from.

    After t of T steps a token is still its original with probability alpha_bar_t + beta_bar_t, is any one
    other code with beta_bar_t, and is [MASK] with gamma_bar_t. alpha_bar falls linearly from 0.99999 to
    0.000009 and gamma_bar rises from 0.000009 to 0.99999 (the paper's values); beta_bar_t = (1 - alpha_bar_t -
    gamma_bar_t) / K. Step 0 is the clean grid (alpha_bar 1, gamma_bar 0). With these end points alpha_bar +
    gamma_bar = 0.999999 at every step, so a token is replaced with probability 1e-6 in all: the released
    schedule is, in effect, pure masking. alpha_bar and 1 - gamma_bar are kept in float64, since beta_bar is
    their small difference, which float32 would round by ~10%."""

    def __init__(self, n_steps, vocab_size):
        super().__init__()
        self.n_steps, self.K = n_steps, vocab_size
        ramp = torch.linspace(0, 1, n_steps, dtype=torch.float64)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), 0.99999 + ramp * (0.000009 - 0.99999)])
        unmasked_bar = torch.cat([torch.ones(1, dtype=torch.float64), 1 - (0.000009 + ramp * (0.99999 - 0.000009))])
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)  # (T + 1,)
        self.register_buffer("unmasked_bar", unmasked_bar, persistent=False)  # (T + 1,) = 1 - gamma_bar

    def transition(self, s, t):
        """q(x_t | x_s) for steps s < t, (B,) each -> (keep, per_code, mask), each (B, 1, 1): a code stays itself
        with probability keep + per_code, becomes each other code with per_code, and [MASK] with mask. Products
        of mask-and-replace matrices keep that form, so this is the T-step transition for s = 0 and one step
        of the fast sampler for any other s (VQ-Diffusion's fast inference)."""
        keep = self.alpha_bar[t] / self.alpha_bar[s]
        unmasked = self.unmasked_bar[t] / self.unmasked_bar[s]
        per_code = (unmasked - keep).clamp_min(0) / self.K
        return [v.float().view(-1, 1, 1) for v in (keep, per_code, 1 - unmasked)]

    def corrupt(self, x0, t, uniform, codes):
        """x_t ~ q(x_t | x_0), the forward process in closed form: x0 (B, N) tokens, t (B,) steps, and the draws
        it uses, uniform (B, N) in [0, 1) and codes (B, N) in [0, K), passed in so that train.py can make them
        a function of the step. -> (B, N) tokens, [MASK] included."""
        keep, per_code, mask = (v.squeeze(2) for v in self.transition(torch.zeros_like(t), t))  # (B, 1) each
        masked = uniform < mask
        replaced = ~masked & (uniform < mask + self.K * per_code)  # a uniform code, x0's own included
        return torch.where(masked, self.K, torch.where(replaced, codes, x0))

    def add_evidence(self, logits, x_t, t):
        """Bayes' rule for the x0 prediction: logits (B, N, K) + log q(x_t | x0), x_t (B, N), t (B,). Where x_t
        is a code j, x0 = j is 1 + alpha_bar_t / beta_bar_t times likelier than any other x0 (the schedule
        replaces 1e-6 of tokens); where it is [MASK], nothing changes. Without it the reverse step re-drew
        every visible token the network doubted, as if it were noise: the speckles of RESULTS.md 1.6."""
        a_t, b_t, _ = (v.squeeze(2) for v in self.transition(torch.zeros_like(t), t))  # (B, 1) each
        boost = torch.where(x_t < self.K, torch.log1p(a_t / b_t), 0.0).to(logits.dtype)  # (B, N)
        # In place: the logits are the head's fresh output, which no backward needs.
        return logits.scatter_add_(-1, x_t.clamp(max=self.K - 1).unsqueeze(-1), boost.unsqueeze(-1))

    def posterior(self, x0, x_t, s, t):
        """q(x_s | x_t, x0) = q(x_s | x0) q(x_t | x_s) / q(x_t | x0) for a known clean grid: x0, x_t (B, N),
        s < t (B,) -> four (B, N) probabilities of the ways x_s comes about: [MASK] (only where x_t is), x0
        kept, the observed code x_t (replaced into it by step s), or a uniformly random code."""
        a_s, b_s, c_s = (v.squeeze(2) for v in self.transition(torch.zeros_like(s), s))  # q(x_s | x0), (B, 1)
        a_t, b_t, c_t = (v.squeeze(2) for v in self.transition(torch.zeros_like(t), t))  # q(x_t | x0)
        keep, per_code, mask = (v.squeeze(2) for v in self.transition(s, t))  # q(x_t | x_s)
        is_mask, is_x0 = x_t == self.K, x_t == x0  # (B, N)
        to_x_t = torch.where(is_mask, mask, per_code)  # (B, N): q(x_t | x_s) from a code other than x_t
        evidence = torch.where(is_mask, c_t, b_t + a_t * is_x0)  # q(x_t | x0)
        from_mask = torch.where(is_mask, c_s, 0) / evidence
        own = a_s * (to_x_t + keep * is_x0) / evidence
        observed = torch.where(is_mask, 0, b_s * keep) / evidence
        uniform = self.K * b_s * to_x_t / evidence
        return from_mask, own, observed, uniform

    def posterior_kl(self, log_p, x0, x_t, s, t):
        """KL(q(x_s | x_t, x0) || p(x_s | x_t)), VQ-Diffusion's eq. 6, at every position (B, N): log_p (B, N, K)
        the model's x0 log-probabilities, x0, x_t (B, N), s < t (B,). The model's step averages q(x_s | x_t, x0')
        over its x0' (eq. 11), so it has the truth's form with p in place of the one-hot x0: one (B, N, K) sum
        and a few gathers, never a (B, N, K + 1) posterior per side (RESULTS.md 2.1)."""
        K = self.K
        a_s, b_s, _ = (v.squeeze(2) for v in self.transition(torch.zeros_like(s), s))  # (B, 1) each
        a_t, b_t, c_t = (v.squeeze(2) for v in self.transition(torch.zeros_like(t), t))
        is_mask, is_x0, j = x_t == K, x_t == x0, x_t.clamp(max=K - 1)  # (B, N); j: the observed code, if any
        from_mask, own, observed, uniform = self.posterior(x0, x_t, s, t)  # the truth
        tiny = 1e-30  # b_s is 0 at s = 0 (whose term is the NLL instead): keep its logs finite
        # The model, per code x: p(x_s = x | x_t) = q(x_t | x_s = x) exp(L_x), with L_x = log(a_s p_x /
        # q(x_t | x0 = x) + b_s sum_i p_i / q(x_t | x0 = i)) = log_uniform + softplus(log p_x + shift), where
        # q(x_t | x0 = x) is c_t or b_t except at the observed code j (a_t + b_t).
        lp_j, lp_k = log_p.gather(-1, torch.stack([j, x0], -1)).unbind(-1)  # (B, N) each; one gather, one backward
        log_sum = torch.where(is_mask, -c_t.log(), torch.logaddexp(
            (-torch.expm1(lp_j)).clamp_min(tiny).log() - b_t.log(), lp_j - (a_t + b_t).log()))
        log_uniform = b_s.clamp_min(tiny).log() + log_sum  # (B, N)
        shift = a_s.log() - torch.where(is_mask, c_t, b_t).log() - log_uniform  # (B, N)
        L_common = lambda lp: log_uniform + F.softplus(lp + shift)  # L_x as if x were not j
        L_j = torch.where(is_mask, L_common(lp_j), log_uniform + F.softplus(lp_j + shift + (b_t / (a_t + b_t)).log()))
        L_k = torch.where(is_x0, L_j, L_common(lp_k))
        L_sum = K * log_uniform + F.softplus(log_p + shift.unsqueeze(-1)).sum(-1) - L_common(lp_j) + L_j  # (B, N)
        # The truth: t_k on x0, t_o on each other code, t_j more on the observed one; [MASK] has the same mass
        # on both sides (it depends on x0 only through sum_i p_i = 1) and drops out.
        t_o = uniform / K
        t_k = own + t_o + observed * is_x0
        t_j = torch.where(is_x0, 0, observed)  # the mass above t_o at j, where j is not k
        # Both sides share q(x_t | x_s = x), so log(truth / model) = log(q(x_s = x | x0) / q(x_t | x0)) - L_x.
        log_evidence = torch.where(is_mask, c_t, b_t + a_t * is_x0).log()  # log q(x_t | x0)
        log_b, log_k = b_s.clamp_min(tiny).log() - log_evidence, (a_s + b_s).log() - log_evidence
        others = (K - 1) * t_o + t_j  # truth mass on codes other than k
        return t_k * (log_k - L_k) + others * log_b - (t_o * (L_sum - L_k) + t_j * L_j)

    def draw_posterior(self, x0, x_t, s, t, generator=None):
        """x_s ~ q(x_s | x_t, x0): x0, x_t (B, N), s < t (B,) -> (B, N) tokens; one uniform picks which of
        posterior()'s four ways, a second draw is the random code."""
        from_mask, own, observed, _ = self.posterior(x0, x_t, s, t)  # (B, N) each
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        random_code = torch.randint(self.K, x0.shape, generator=generator, device=x0.device)
        return torch.where(u < from_mask, self.K, torch.where(u < from_mask + own, x0,
                           torch.where(u < from_mask + own + observed, x_t, random_code)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block, bidirectional, with two adaptive LayerNorms (CLIP-VQDiffusion): the
    timestep modulates the norm before attention, the CLIP condition the norm before the MLP, each as
    LN(x) * (1 + scale) + shift with scale and shift zero-initialised (so training starts from plain LN)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.ln_1 = nn.LayerNorm(C, elementwise_affine=False)
        self.attn = prior.SelfAttention(cfg, causal=False)
        self.ln_2 = nn.LayerNorm(C, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate=cfg.gelu), nn.Linear(4 * C, C),
                                 nn.Dropout(cfg.dropout))
        self.ada_step = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.ada_cond = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, step, cond):  # x (B, N, C); step, cond (B, C)
        shift, scale = self.ada_step(step).unsqueeze(1).chunk(2, dim=-1)  # 2x (B, 1, C)
        x = x + self.attn(self.ln_1(x) * (1 + scale) + shift)
        shift, scale = self.ada_cond(cond).unsqueeze(1).chunk(2, dim=-1)
        return x + self.mlp(self.ln_2(x) * (1 + scale) + shift)


class DiffusionPrior(nn.Module):
    """p(x0 | x_t, t, CLIP embedding): logits over the K codes at every position of the grid."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.schedule = Schedule(cfg.n_steps, cfg.vocab_size)
        # As in prior.Prior: the learned "no condition" input for guidance, and the images' mean embedding.
        self.null_embedding = nn.Parameter(torch.randn(cfg.clip_dim) / cfg.clip_dim ** 0.5)
        self.register_buffer("embedding_mean", torch.zeros(cfg.clip_dim))
        self.cond_proj = nn.Linear(cfg.clip_dim, C)
        self.step_emb = nn.Embedding(cfg.n_steps + 1, C)  # a learned vector per step, as VQ-Diffusion's AdaLN
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, C)  # the codes and [MASK]
        self.pos_emb = nn.Parameter(torch.zeros(cfg.n_tokens, C))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)  # x0 is never [MASK]
        for name, p in self.named_parameters():  # GPT-2's initialisation, as prior.Prior's
            if name.endswith("bias") or ".ada_" in name:
                nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)
            elif p.dim() >= 2 or name == "pos_emb":
                nn.init.normal_(p, std=0.02)

    def forward(self, embeddings, x_t, t, drop=None):
        """embeddings (B, clip_dim) CLIP embeddings, x_t (B, N) noisy tokens, t (B,) steps in 1..T, drop (B,)
        rows given the null condition -> (B, N, K) logits of x0: the network's guess and what x_t says of x0."""
        cond = prior.unit_condition(embeddings, drop, self.null_embedding, self.embedding_mean,
                                    self.cfg.remove_mean).to(self.cond_proj.weight.dtype)
        x = self.drop(self.tok_emb(x_t) + self.pos_emb)  # (B, N, C)
        step, c = self.step_emb(t), self.cond_proj(cond)  # (B, C) each
        for block in self.blocks:
            x = block(x, step, c)
        return self.schedule.add_evidence(self.head(self.ln_f(x)), x_t, t)

    def reverse_steps(self, steps=None):
        """The reverse steps a sampler takes: `steps`, checked against the T trained, or all T if None."""
        T = self.cfg.n_steps
        if steps is not None and not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}: this prior was trained with {T} steps (got {steps})")
        return T if steps is None else steps

    @torch.no_grad()
    def sample(self, embeddings, temperature=1.0, top_k=None, top_p=None, guidance=1.0, generator=None, steps=None):
        """(B, clip_dim) CLIP embeddings, or (B, P, clip_dim) for prompts in P parts -> (B, n_tokens)
        sampled tokens, from a grid of [MASK] at step T.

        steps: reverse steps to take (default: all T); fewer visit evenly spaced steps, jumping from t to the
        next s < t with the exact q(x_s | x_t, x0) (VQ-Diffusion's fast inference). temperature, top_k and
        top_p shape each step's x0 prediction; top_p is VQ-Diffusion's truncation (CLIP-VQDiffusion: 0.85).
        guidance != 1, or P > 1, mixes conditional and null-conditioned log-probabilities of x0 as the GPT
        prior mixes its logits (prior.mix_guided; Tang et al. 2022 for discrete diffusion). Three draws per
        position and step from `generator` (x0, the way x_s comes about, a random code), the same with or
        without guidance."""
        B, N, K, T = embeddings.shape[0], self.cfg.n_tokens, self.cfg.vocab_size, self.cfg.n_steps
        steps = self.reverse_steps(steps)
        embeddings, drop, copies = prior.guided_rows(embeddings, guidance)
        device = embeddings.device
        times = torch.linspace(T, 0, steps + 1, device=device).round().long()  # T = t_0 > t_1 > ... > 0
        x = torch.full((B, N), K, dtype=torch.long, device=device)
        for t, s in zip(times[:-1], times[1:]):
            fed = x.repeat(copies, 1)
            log_p = self(embeddings, fed, t.expand(len(fed)), drop).float().log_softmax(-1)  # (copies x B, N, K)
            if copies > 1:
                log_p = prior.mix_guided(log_p, B, guidance).log_softmax(-1)
            x0_probs = prior.filter_logits(log_p, temperature, top_k, top_p).softmax(-1)  # (B, N, K)
            # p(x_s | x_t) is q(x_s | x_t, x0) averaged over the model's x0 (eq. 11): draw x0, then x_s given it.
            x0 = torch.multinomial(x0_probs.flatten(0, 1), 1, generator=generator).view(B, N)
            x = self.schedule.draw_posterior(x0, x, s.expand(B), t.expand(B), generator)
        return x  # at s = 0 the posterior gives [MASK] no mass


def diffusion_loss(logits, x0, x_t, t, schedule, aux_weight):
    """VQ-Diffusion's training loss: the variational bound plus lambda times the auxiliary x0 loss.
    -> (loss, vlb, aux), scalars; every term is in nats per token.

    logits (B, N, K) of x0 from forward(condition, x_t, t); x0 (B, N) the true tokens; t (B,) steps in 1..T.
    The bound's term at step t > 1 is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) (Schedule.posterior_kl);
    at t = 1 it is -log p(x0 | x_1). With t drawn uniformly, their mean estimates the bound up to the factor T
    (VQ-Diffusion draws t by importance instead).
    The auxiliary loss is the cross-entropy of the x0 prediction itself, weighted by 2 - t/T as in
    VQ-Diffusion's code: it gives the network a direct signal that the bound, which unmasks ~1/t of the
    masked tokens per step, dilutes."""
    log_p = logits.float().log_softmax(-1)  # (B, N, K)
    nll = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (B, N): -log p(x0 | x_t)
    kl = schedule.posterior_kl(log_p, x0, x_t, t - 1, t)  # (B, N)
    vlb = torch.where((t == 1).unsqueeze(1), nll, kl).mean()
    aux = (nll.mean(1) * (2 - t.float() / schedule.n_steps)).mean()
    return vlb + aux_weight * aux, vlb, aux


def from_checkpoint(ckpt, path, device="cpu"):
    """A DiffusionPrior rebuilt from a checkpoint dict train.py wrote (read from `path`), in eval mode."""
    if ckpt.get("prior_type") != "diffusion":
        raise ValueError(f"{path} holds a GPT prior, not a diffusion one; load it with clipgen.load_prior")
    model = DiffusionPrior(prior.saved_config(DiffusionConfig, ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt

