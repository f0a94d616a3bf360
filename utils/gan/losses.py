"""GAN losses on discriminator logits, by name: the non-saturating loss of utils/gan/steps.py and the hinge loss.

Hinge (Lim & Ye 2017; Miyato et al. 2018): D minimises relu(1 - D(real)) + relu(1 + D(fake)), G minimises
-D(fake). Both are means over the batch, so under DP-SGD each sample's term is separate as Opacus needs. Logit
0 is the decision boundary of both losses (D says "real" above it), which `dsteps.fake_accuracy` relies on.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from utils.gan.steps import d_loss, g_loss


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


@dataclass(frozen=True)
class GANLoss:
    """The discriminator's loss d(real_logits, fake_logits) and the generator's g(fake_logits)."""
    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]


GAN_LOSSES = {"non-saturating": GANLoss(d_loss, g_loss), "hinge": GANLoss(hinge_d_loss, hinge_g_loss)}
