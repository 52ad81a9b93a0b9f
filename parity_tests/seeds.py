"""The two seed documents' code, run as written, and the mapping of their weights.

Both seeds are PyTorch. Their bodies below are copied from ``shared/seeds/`` with
only the wrapping changed (the answer code becomes a function of its inputs; the
tutorial class keeps its name and body). Their known mistakes are kept on purpose:
seed 2 shares one head_dim x head_dim projection across heads, scales by
sqrt(embed_size) and fills masks with -1e20.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def seed1_answer(X, W_Q, W_K, W_V, a_K, a_V):
    """The accepted answer of seed 000 (X [B, S, H, D], W [H, D, D], a [S, S, H, D])."""
    B, S, H, D = X.shape
    d_z = D  # Assuming d_z is equal to D for simplicity

    XW_Q = torch.einsum('bshd,hde->bshe', X, W_Q)  # [B, S, H, D] @ [H, D, D] -> [B, S, H, D]
    XW_K = torch.einsum('bshd,hde->bshe', X, W_K)  # [B, S, H, D] @ [H, D, D] -> [B, S, H, D]

    e_ij_numerator = (XW_Q.unsqueeze(2) * (XW_K.unsqueeze(1) + a_K)).sum(dim=-1)  # [B, S, S, H]
    e_ij = e_ij_numerator / torch.sqrt(torch.tensor(d_z, dtype=torch.float32))  # [B, S, S, H]
    alpha = F.softmax(e_ij, dim=2)  # [B, S, S, H]
    XW_V = torch.einsum('bshd,hde->bshe', X, W_V)  # [B, S, H, D] @ [H, D, D] -> [B, S, H, D]

    z_i = torch.einsum('bijh,bijhd -> bihd', alpha, (XW_V.unsqueeze(1) + a_V))  # [B, S, S, H] * [B, S, S, H, D] -> [B, S, S, H, D]
    return z_i


def seed1_scale(D: int) -> float:
    """The seed divides by sqrt(D) computed in float32; this is that exact scale."""
    return 1.0 / float(torch.sqrt(torch.tensor(D, dtype=torch.float32)))


class MultiHeadAttention(nn.Module):
    """Seed 001's tutorial module, verbatim."""

    def __init__(self, embed_size, num_heads):
        super(MultiHeadAttention, self).__init__()
        self.embed_size = embed_size
        self.num_heads = num_heads
        self.head_dim = embed_size // num_heads
        assert (
            self.head_dim * num_heads == embed_size
        ), "Embedding size needs to be divisible by num_heads"
        self.values = nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.keys = nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.queries = nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.fc_out = nn.Linear(num_heads * self.head_dim, embed_size)

    def forward(self, values, keys, query, mask):
        N = query.shape[0]
        value_len, key_len, query_len = values.shape[1], keys.shape[1], query.shape[1]
        # 将values, keys, queries分成多个头
        values = values.reshape(N, value_len, self.num_heads, self.head_dim)
        keys = keys.reshape(N, key_len, self.num_heads, self.head_dim)
        queries = query.reshape(N, query_len, self.num_heads, self.head_dim)
        # 进行线性变换
        values = self.values(values)
        keys = self.keys(keys)
        queries = self.queries(queries)
        # Scaled dot-product attention(使用了爱因斯坦求和)
        # 这里直接求出kq矩阵
        attention = torch.einsum("nqhd,nkhd->nhqk", [queries, keys])
        if mask is not None:
            attention = attention.masked_fill(mask == 0, float("-1e20"))
        # 使用softmax来归一化成注意力分数,分母是为了防止注意力分数相差过大
        attention = torch.softmax(attention / (self.embed_size ** (1 / 2)), dim=3)
        # 注意力分数和对应的value求加权和
        out = torch.einsum("nhql,nlhd->nqhd", [attention, values]).reshape(
            N, query_len, self.num_heads * self.head_dim
        )
        out = self.fc_out(out)
        return out


Seed2MultiHeadAttention = MultiHeadAttention


def seed2_params(seed: MultiHeadAttention) -> dict[str, np.ndarray]:
    """The seed-2 module's weights as ``RelativeMultiHeadAttention`` parameters.

    Its per-head-shared ``Linear(head_dim, head_dim)`` is a block-diagonal full
    projection: w[n * H + i, n, o] = W[o, i]. It has no q/k/v biases (zeros here);
    ``fc_out`` becomes w_o [N, H, E] and b_o. Use with relative terms off and
    ``scale = 1 / sqrt(embed_size)``.
    """
    N, H, E = seed.num_heads, seed.head_dim, seed.embed_size

    def block_diagonal(linear: nn.Linear) -> np.ndarray:
        W = linear.weight.detach().cpu().double().numpy()  # [out, in]
        w = np.zeros((E, N, H))
        for n in range(N):
            w[n * H:(n + 1) * H, n, :] = W.T
        return w

    fc_w = seed.fc_out.weight.detach().cpu().double().numpy()  # [E, N * H]
    return {
        "w_q": block_diagonal(seed.queries),
        "w_k": block_diagonal(seed.keys),
        "w_v": block_diagonal(seed.values),
        "w_o": fc_w.T.reshape(N, H, E),
        "b_q": np.zeros((N, H)),
        "b_k": np.zeros((N, H)),
        "b_v": np.zeros((N, H)),
        "b_o": seed.fc_out.bias.detach().cpu().double().numpy(),
    }
