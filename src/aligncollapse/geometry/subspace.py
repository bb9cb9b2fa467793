"""The safety subspace M: top-d eigenpairs of a skill Fisher, with projection and quadratic forms.

Vectors live in the flattened space of the selected parameter blocks (``names``, in order). The
basis B ∈ ℝ^{n×d} has orthonormal columns; P = B Bᵀ is the Euclidean projector onto M and
F_M = B diag(λ) Bᵀ the Fisher restricted to M (paper Def 3.4). Saved as safetensors + JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aligncollapse.errors import UserError
from aligncollapse.results import atomic_write_json


@dataclass
class SafetySubspace:
    eigenvalues: torch.Tensor  # [d], descending
    basis: torch.Tensor  # [n, d], orthonormal columns
    names: list[str]
    shapes: list[tuple[int, ...]]
    fisher: str = "empirical"  # or "sampled"
    trace: float | None = None  # tr F over the selected blocks (for tail mass)
    n_samples: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def n(self) -> int:
        return int(self.basis.shape[0])

    def flatten(self, v: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A flat vector from a flat tensor or a name -> tensor mapping (e.g. ΔW per module)."""
        if isinstance(v, Mapping):
            missing = [n for n in self.names if n not in v]
            if missing:
                raise UserError(f"vector is missing blocks {missing[:3]} of the subspace")
            v = torch.cat([v[n].reshape(-1) for n in self.names])
        if v.numel() != self.n:
            raise UserError(f"vector has {v.numel()} entries, the subspace's space has {self.n}")
        return v.reshape(-1).to(self.basis.dtype)

    def coordinates(self, v) -> torch.Tensor:
        """Bᵀ v: coordinates of v in the eigenbasis of M."""
        return self.basis.T @ self.flatten(v)

    def project(self, v) -> torch.Tensor:
        """P v = B Bᵀ v (flat)."""
        return self.basis @ self.coordinates(v)

    def project_out(self, v) -> torch.Tensor:
        """P⊥ v = v − P v (flat)."""
        x = self.flatten(v)
        return x - self.basis @ (self.basis.T @ x)

    def quadratic_form(self, v) -> float:
        """vᵀ F_M v = Σ_j λ_j (b_jᵀ v)²."""
        c = self.coordinates(v)
        return float((self.eigenvalues * c * c).sum())

    def fisher_norm(self, v) -> float:
        """‖F^{1/2} P v‖ = sqrt(vᵀ F_M v) (P projects onto eigenvectors of F)."""
        return self.quadratic_form(v) ** 0.5

    def truncate(self, d: int) -> SafetySubspace:
        return SafetySubspace(
            self.eigenvalues[:d].clone(),
            self.basis[:, :d].clone(),
            self.names,
            self.shapes,
            self.fisher,
            self.trace,
            self.n_samples,
            dict(self.meta),
        )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"eigenvalues": self.eigenvalues.contiguous(), "basis": self.basis.contiguous()},
            str(path / "subspace.safetensors"),
        )
        atomic_write_json(
            path / "subspace.json",
            {
                "names": self.names,
                "shapes": [list(s) for s in self.shapes],
                "fisher": self.fisher,
                "trace": self.trace,
                "n_samples": self.n_samples,
                "d": self.d,
                "meta": self.meta,
            },  # fmt: skip
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> SafetySubspace:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "subspace.json").exists():
            raise UserError(f"{path}: no subspace.json (write one with 'aligncollapse fisher')")
        meta = json.loads((path / "subspace.json").read_text())
        t = load_file(str(path / "subspace.safetensors"))
        return cls(t["eigenvalues"], t["basis"], meta["names"], [tuple(s) for s in meta["shapes"]], meta["fisher"], meta["trace"],
                   meta["n_samples"], meta.get("meta", {}))  # fmt: skip


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of a [n, p] and b [n, q]."""
    qa, _ = torch.linalg.qr(a.to(torch.float64))
    qb, _ = torch.linalg.qr(b.to(torch.float64))
    s = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(s)
