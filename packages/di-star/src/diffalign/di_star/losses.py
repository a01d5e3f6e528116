"""Diff-Instruct* losses as pure functions.

Notation (DDPM / variance-preserving):  x_t = alpha_t * x0 + sigma_t * eps,  alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t).  A network in epsilon-parameterisation gives the score
s(x_t) = -eps_hat(x_t) / sigma_t, and the conditional score of the forward kernel is
grad log q_t(x_t | x0) = -eps / sigma_t.

The DI* objective is

    L(theta) = -alpha_rew * E[r(g_theta(z, c), c)] + int w(t) E_{x_t ~ sg(p_theta,t)} d(s_p_theta - s_ref^cfg) dt

and its tractable generator surrogate (score-identity form, reference minus fake) is

    w(t) * d'(u)^T (s_fake(x_t) - grad log q_t(x_t | x0)),   u = s_ref^cfg(x_t) - s_fake(x_t),

where gradients flow from theta through x0 and x_t into *both* network outputs, including the argument of
d'(.): only the parameters of the reference and fake networks are frozen.  In epsilon units this reads

    w(t) * [(eps_fake - eps_ref) / sqrt(||eps_fake - eps_ref||^2 + c^2 sigma_t^2)]^T (eps - eps_fake) / sigma_t

for the pseudo-Huber distance d(y) = sqrt(||y||^2 + c^2) - c (c is in score units).

Every function here returns one value per sample (shape [B]); the trainer takes the mean.
"""

from __future__ import annotations

from typing import Literal

import torch

from diffalign.core.denoisers import prediction_target

Distance = Literal["pseudo_huber", "l2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Weighting = Literal["constant", "sigma", "sigma_sq"]

__all__ = [
    "Distance",
    "PredictionType",
    "Weighting",
    "expand_like",
    "classifier_free_guidance",
    "distance_value",
    "distance_gradient",
    "score_divergence_surrogate",
    "di_star_generator_loss",
    "implicit_cfg_reward_loss",
    "kl_generator_loss",
    "fake_score_dsm_loss",
    "reward_loss",
    "timestep_weight",
]


def expand_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor [B] (or a scalar) so that it broadcasts against ``like`` [B, ...]."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.ndim == 0:
        return values
    if values.shape[0] != like.shape[0]:
        raise ValueError(f"per-sample values have batch {values.shape[0]}, tensor has {like.shape[0]}")
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


def _flat_sq_norm(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1).pow(2).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------
# parameterisation conversions
# ---------------------------------------------------------------------------------------------------------


def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """eps_cfg = eps_uncond + guidance_scale * (eps_cond - eps_uncond). Scale 1 = conditional, 0 = unconditional."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------------------


def _check_distance(distance: str, huber_c: float) -> None:
    if distance == "pseudo_huber":
        if not huber_c > 0:
            raise ValueError(f"pseudo-Huber needs huber_c > 0, got {huber_c}")
    elif distance != "l2":
        raise ValueError(f"unknown distance {distance!r}; expected 'pseudo_huber' or 'l2'")


def distance_value(
    y: torch.Tensor, distance: Distance = "pseudo_huber", huber_c: float = 1.0
) -> torch.Tensor:
    """d(y) per sample over all non-batch dimensions: sqrt(||y||^2 + c^2) - c, or ||y||^2 for ``l2``."""
    _check_distance(distance, huber_c)
    sq = _flat_sq_norm(y)
    if distance == "l2":
        return sq
    return torch.sqrt(sq + huber_c**2) - huber_c


def distance_gradient(
    y: torch.Tensor, distance: Distance = "pseudo_huber", huber_c: float = 1.0
) -> torch.Tensor:
    """d'(y) with the shape of y: y / sqrt(||y||^2 + c^2) (pseudo-Huber) or 2 y (squared L2).

    Differentiable in y (the generator gradient needs d' to carry gradient, see module docstring).
    """
    _check_distance(distance, huber_c)
    if distance == "l2":
        return 2.0 * y
    norm = torch.sqrt(_flat_sq_norm(y) + huber_c**2)
    return y / expand_like(norm, y)


# ---------------------------------------------------------------------------------------------------------
# generator losses
# ---------------------------------------------------------------------------------------------------------


def score_divergence_surrogate(
    score_fake: torch.Tensor,
    score_ref: torch.Tensor,
    grad_log_q: torch.Tensor,
    distance: Distance = "pseudo_huber",
    huber_c: float = 1.0,
) -> torch.Tensor:
    """Score-unit form of the tractable loss: d'(s_ref - s_fake)^T (s_fake - grad log q_t(x_t|x0)).

    Its gradient w.r.t. generator parameters (through x_t, with network parameters frozen) equals the
    gradient of  E_{x ~ sg(q_theta,t)} d(s_ref(x) - s_q_theta(x))  when s_fake is the score of q_theta,t.
    """
    u = score_ref - score_fake
    return _flat_dot(distance_gradient(u, distance, huber_c), score_fake - grad_log_q)


def di_star_generator_loss(
    eps_fake: torch.Tensor,
    eps_ref: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor | float = 1.0,
    distance: Distance = "pseudo_huber",
    huber_c: float = 1.0,
) -> torch.Tensor:
    """DI* divergence term of the generator loss in epsilon units, per sample.

    eps_fake: fake-score prediction eps_psi(x_t, t, c); eps_ref: the reference target (for DI*-IN already
    CFG-combined, see ``classifier_free_guidance``); noise: the eps used to build x_t; sigma: sigma_t [B].
    Both eps predictions must be computed from the differentiable x_t (do not detach them).

    pseudo-Huber:  w * (eps_fake - eps_ref)^T (noise - eps_fake) / (sigma * sqrt(||eps_fake - eps_ref||^2
    + c^2 sigma^2));  squared L2:  w * 2 (eps_fake - eps_ref)^T (noise - eps_fake) / sigma^2.
    """
    _check_distance(distance, huber_c)
    sig = expand_like(sigma, eps_fake).to(eps_fake.dtype)
    diff = eps_fake - eps_ref  # = sigma * (s_ref - s_fake) = sigma * u
    bracket = (noise - eps_fake) / sig  # = s_fake - grad log q
    if distance == "l2":
        direction = 2.0 * diff / sig
    else:
        norm = torch.sqrt(_flat_sq_norm(diff) + (huber_c**2) * sig.flatten(1)[:, 0] ** 2)
        direction = diff / expand_like(norm, diff)
    return torch.as_tensor(weight, dtype=eps_fake.dtype, device=eps_fake.device) * _flat_dot(
        direction, bracket
    )


def implicit_cfg_reward_loss(
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    guidance_scale: float,
    weight: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """DI*-OUT: CFG as a separate implicit reward (alpha_cfg - 1) log p_ref(c | x_t), as a loss to minimise.

    grad_x log p(c|x_t) = s(x_t|c) - s(x_t) = -(eps_cond - eps_uncond) / sigma; the network outputs are
    treated as that gradient (detached) and the loss carries gradient only through x_t:

        loss = w * (alpha_cfg - 1) * sg((eps_cond - eps_uncond) / sigma)^T x_t
    """
    sig = expand_like(sigma, x_t).to(x_t.dtype)
    direction = ((eps_cond - eps_uncond) / sig).detach()
    return (
        torch.as_tensor(weight, dtype=x_t.dtype, device=x_t.device)
        * (guidance_scale - 1.0)
        * _flat_dot(direction, x_t)
    )


def kl_generator_loss(
    eps_fake: torch.Tensor,
    eps_ref: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Diff-Instruct / DI++ integral-KL regulariser (baseline), per sample.

    grad_theta KL(q_theta,t || p_ref,t) = E[(s_fake - s_ref)(x_t)^T dx_t/dtheta], so with
    s = -eps/sigma:  loss = w * sg((eps_ref - eps_fake) / sigma)^T x_t.
    """
    sig = expand_like(sigma, x_t).to(x_t.dtype)
    direction = ((eps_ref - eps_fake) / sig).detach()
    return torch.as_tensor(weight, dtype=x_t.dtype, device=x_t.device) * _flat_dot(direction, x_t)


def reward_loss(rewards: torch.Tensor, alpha_rew: float) -> torch.Tensor:
    """-alpha_rew * r per sample (higher reward is better)."""
    return -alpha_rew * rewards


# ---------------------------------------------------------------------------------------------------------
# fake score
# ---------------------------------------------------------------------------------------------------------


def fake_score_dsm_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: PredictionType = "epsilon",
) -> torch.Tensor:
    """Denoising score matching for the online fake score, per sample (mean over non-batch dims).

    The target follows the network's own parameterisation: eps (epsilon), a*eps - s*x0 (v_prediction) or
    x0 (sample). x0 must come from the generator *detached*; the caller is responsible for that.
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; DI* trains DDPM-family networks")
    target = prediction_target(x0, noise, expand_like(alpha, x0), expand_like(sigma, x0), prediction_type)
    return (model_output - target).flatten(1).pow(2).mean(dim=1)


def timestep_weight(alpha: torch.Tensor, sigma: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """w(t) per sample. ``constant`` = 1; ``sigma`` = sigma_t (makes the epsilon-unit loss O(1) at every t);
    ``sigma_sq`` = sigma_t^2. The paper does not give w(t); the choice is a recipe hyperparameter."""
    if weighting == "constant":
        return torch.ones_like(sigma)
    if weighting == "sigma":
        return sigma
    if weighting == "sigma_sq":
        return sigma**2
    raise ValueError(f"unknown weighting {weighting!r}; expected constant, sigma or sigma_sq")
