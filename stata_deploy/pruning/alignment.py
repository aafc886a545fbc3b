"""STATA's attention alignment losses (training only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ alignment
def intra_alignment(maps: torch.Tensor) -> torch.Tensor:
    """Intra-Alignment: split maps (T, B, H, n, n) along timesteps and heads, sort by l2 norm, pull the bottom
    half toward the (detached) top half. Zero when all maps are identical."""
    T, B, H, n, _ = maps.shape
    units = maps.permute(1, 0, 2, 3, 4).reshape(B, T * H, n * n)
    if T * H < 2:
        return maps.new_zeros(())
    order = units.norm(dim=-1).argsort(dim=-1, descending=True)
    units = torch.gather(units, 1, order.unsqueeze(-1).expand_as(units))
    half = (T * H) // 2
    top, bottom = units[:, :half], units[:, T * H - half :]
    return F.mse_loss(bottom, top.detach())


def inter_alignment(shallow: list[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
    """Inter-Alignment: the deepest map (detached, head-mean, interpolated) supervises each shallower one."""
    teacher = deep.mean(2).detach()  # (T, B, n_d, n_d)
    loss = deep.new_zeros(())
    for m in shallow:
        student = m.mean(2)  # (T, B, n_s, n_s)
        T, B, n, _ = student.shape
        t = F.interpolate(teacher.reshape(T * B, 1, *teacher.shape[-2:]), size=(n, n), mode="bilinear", align_corners=False)
        loss = loss + F.mse_loss(student, t.reshape(T, B, n, n))
    return loss
