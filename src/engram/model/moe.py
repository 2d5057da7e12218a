"""DeepSeek-style mixture of experts with loss-free load balancing.

Every token passes through the shared experts and through its ``top_k`` routed experts. The router
scores experts (sigmoid or softmax); a per-expert bias, added for *selection only*, steers tokens
away from overloaded experts: after each optimizer step ``update_bias`` moves it by
``+/- bias_update_rate`` against the expert's load, so no auxiliary loss is needed (an optional small
one is available). Shapes: N tokens, d width, E routed experts, k = top_k.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engram.model.config import MoEConfig
from engram.model.layers import SwiGLU


class MoE(nn.Module):
    """Shared plus routed SwiGLU experts: (..., d) -> (..., d)."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = nn.Linear(dim, config.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, config.expert_hidden) for _ in range(config.n_routed_experts))
        self.shared = SwiGLU(dim, config.n_shared_experts * config.expert_hidden) if config.n_shared_experts else None
        # Selection bias of loss-free balancing: state, not a parameter (it has no gradient).
        self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts))
        self.register_buffer("load", torch.zeros(config.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, d)
        logits = self._route(tokens)  # (N, E), at least float32
        scores = logits.sigmoid() if self.config.score_func == "sigmoid" else logits.softmax(dim=-1)
        chosen = torch.topk(scores + self.expert_bias, self.config.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, chosen)
        if self.config.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = (weights * self.config.route_scale).to(x.dtype)

        out = self.shared(tokens) if self.shared is not None else torch.zeros_like(tokens)
        flat_expert = chosen.flatten()  # (N*k,)
        order = flat_expert.argsort(stable=True)
        # Assignments per expert; unlike bincount, whose output size depends on the ids' maximum, the
        # scatter needs no host read.
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=flat_expert.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        token_of = order // self.config.top_k  # token index of each sorted assignment
        weight_of = weights.flatten()[order]
        # The one host read of the layer: how many tokens each expert takes, the shapes of its matmuls
        # (a dropless MoE cannot know them without reading the routing). Traced by torch.compile with
        # torch._dynamo.config.capture_scalar_outputs = True, without a graph break.
        sizes = counts.tolist()
        for expert, idx, weight in zip(self.experts, token_of.split(sizes), weight_of.split(sizes), strict=True):
            out.index_add_(0, idx, expert(tokens[idx]) * weight[:, None])  # an expert without tokens adds nothing

        if self.training:
            self.load += counts.to(self.load.dtype)
        self.aux_loss = self._balance_loss(scores, counts) if self.config.aux_loss_weight > 0 else None
        return out.reshape(shape)

    def _route(self, tokens: torch.Tensor) -> torch.Tensor:
        """Router logits in at least float32, outside autocast: under bf16 a few percent of tokens
        would pick other experts, and score errors would exceed the balancing step."""
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(tokens.device.type, enabled=False):
            return F.linear(tokens.to(dtype), self.router.weight.to(dtype))

    def _balance_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's balance loss: weight * E * sum_i f_i * P_i (f: share of assignments, P: mean score)."""
        n_tokens = scores.shape[0]
        share = counts.float() / (n_tokens * self.config.top_k)
        mean_score = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
        return self.config.aux_loss_weight * len(self.experts) * (share * mean_score).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step from the loads seen since the last call, then reset the loads."""
        # No tokens seen (all loads 0): every sign is 0 and the bias stays; no host read to find out.
        self.expert_bias += self.config.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
