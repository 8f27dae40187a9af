"""Dense attention in plain torch: the ground truth every variant is tested against, and the way paths that
do not expose their weights (SDPA) report statistics. Rows are processed in chunks so memory stays
O(chunk x keys) rather than O(queries x keys).

Learned attention sinks (transformers passes them as `s_aux`, GPT-OSS): one logit per query head that joins every
row's softmax as an extra column and weighs no value, so a row's key weights sum to less than 1 (transformers'
eager GPT-OSS attention). The statistics follow: `probs` and `key_mass` are the key columns (what that eager code
returns as weights); `entropy` is that of the whole row distribution, the sink column included (it sums to 1).
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.attention.base import AttentionCall
from workbench.errors import UnsupportedError

ROW_CHUNK = 256


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Bool (q_len, k_len): query i (the (k_len - q_len + i)-th token) may attend to keys up to itself."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= rows


def allowed(call: AttentionCall, rows: slice = slice(None)) -> torch.Tensor:
    """Bool mask broadcastable to (batch, heads, q_rows, k_len) for the given query rows."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    if call.mask is not None:
        return call.mask[:, :, rows, :]
    return causal_mask(q_len, k_len, call.query.device)[rows][None, None]


def by_group(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (batch, heads, q, x) @ b (batch, kv_heads, x, y) -> (batch, heads, q, y), query head h using KV head
    h // groups (GQA), without repeating b for every query head."""
    batch, heads, q, x = a.shape
    return torch.matmul(a.reshape(batch, b.shape[1], heads // b.shape[1] * q, x), b).view(batch, heads, q, -1)


def scores(call: AttentionCall, rows: slice = slice(None)) -> torch.Tensor:
    """Float32 scaled scores (batch, heads, q_rows, k_len), -inf where the mask forbids attending."""
    s = by_group(call.query[:, :, rows].float(), call.key.float().transpose(-1, -2)) * call.scaling
    softcap = call.kwargs.get("softcap")
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if call.mask is None and call.query.shape[2] == 1:
        return s  # one decoding query at the end of the keys: causal means it sees them all
    return s.masked_fill(~allowed(call, rows), float("-inf"))


def has_sinks(call: AttentionCall) -> bool:
    """Whether the model passed learned attention sinks (`s_aux`) for this call."""
    return call.kwargs.get("s_aux") is not None


def sink_logits(call: AttentionCall, rows: slice = slice(None)) -> torch.Tensor | None:
    """Float32 (batch, heads, q_rows, 1): each query head's learned sink logit, or None without sinks."""
    if not has_sinks(call):
        return None
    s_aux, (batch, heads, _, _) = call.kwargs["s_aux"], call.query.shape
    if s_aux.numel() != heads:
        raise UnsupportedError(f"learned attention sinks (s_aux) have shape {tuple(s_aux.shape)}; expected one logit "
                               f"per query head ({heads})")
    q_rows = call.query[:, :, rows].shape[2]
    return s_aux.float().reshape(1, heads, 1, 1).expand(batch, heads, q_rows, 1)


def sink_softmax(scores: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over [scores, sink]: (key weights (..., K), the whole distribution (..., K + 1), sink last)."""
    distribution = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)
    return distribution[..., :-1], distribution


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dim; 0 log 0 counts as 0."""
    return torch.special.entr(probs).sum(-1)


def row_chunks(q_len: int) -> list[slice]:
    """Query rows in chunks of ROW_CHUNK: what every chunked computation over attention rows iterates."""
    return [slice(start, min(start + ROW_CHUNK, q_len)) for start in range(0, q_len, ROW_CHUNK)]


def softmax_weights(scores: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention: the softmax rows both weigh the values and are the distribution."""
    probs = torch.softmax(scores, dim=-1)
    return probs, probs


def dense_attention(call: AttentionCall, want: frozenset[str] = frozenset(), with_output: bool = True,
                    weigh=softmax_weights):
    """Dense attention under the call's mask: (output, statistics).

    output is (batch, q_len, heads, head_dim) in the query dtype, or None when `with_output` is False (the
    caller has its own output and only needs the statistics); statistics holds what `want` names (see
    workbench.attention.base.STATISTICS). `weigh(scores, rows) -> (weights, distribution)` turns a chunk of
    scaled scores (-inf where masked) into the weights that multiply the values and the row distribution the
    statistics describe (both the softmax by default; variants that change the attention function pass their
    own). With learned sinks (see the module docstring) the softmax takes the sink column; `weigh` must then be the
    plain softmax (a changed attention function has no defined sink)."""
    value = call.value.float() if with_output else None
    outputs, parts = [], {name: [] for name in want}
    for rows in row_chunks(call.query.shape[2]):
        sink = sink_logits(call, rows)
        if sink is None:
            weights, probs = weigh(scores(call, rows), rows)
            distribution = probs
        else:
            if weigh is not softmax_weights:
                raise UnsupportedError("learned attention sinks (s_aux) are defined for softmax attention only")
            probs, distribution = sink_softmax(scores(call, rows), sink)
            weights = probs
        if with_output:
            outputs.append(by_group(weights, value))
        if "entropy" in want:
            parts["entropy"].append(row_entropy(distribution))
        if "probs" in want:
            parts["probs"].append(probs)
        if "key_mass" in want:
            parts["key_mass"].append(group_key_mass(probs, call.groups))
    output = torch.cat(outputs, dim=2).transpose(1, 2).to(call.query.dtype) if with_output else None
    statistics = {name: torch.cat(chunks, dim=2) for name, chunks in parts.items() if name != "key_mass"}
    if "key_mass" in want:
        statistics["key_mass"] = torch.stack(parts["key_mass"]).sum(0)
    return output, statistics


def group_key_mass(probs: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, heads, q, k) attention rows -> (batch, kv_heads, k): mass each key got from its group's queries."""
    batch, heads, _, keys = probs.shape
    return probs.sum(dim=2).view(batch, heads // groups, groups, keys).sum(dim=2)


def head_rows(call: AttentionCall, heads: tuple[int, ...] | None = None) -> torch.Tensor:
    """Attention rows (batch, len(heads), q_len, k_len) float32 for the given query heads only (None = all):
    a dense recomputation of just those heads, so a fused path that keeps a few heads' rows stays linear in
    memory for the rest."""
    if heads is None:
        heads = tuple(range(call.query.shape[1]))
    kv_heads = [h // call.groups for h in heads]
    mask = call.mask
    if mask is not None and mask.shape[1] > 1:
        mask = mask[:, list(heads)]
    kwargs = call.kwargs
    if has_sinks(call):  # each kept head keeps its own sink logit
        kwargs = {**kwargs, "s_aux": kwargs["s_aux"].reshape(-1)[list(heads)]}
    one_head_each = dataclasses.replace(call, query=call.query[:, list(heads)], key=call.key[:, kv_heads],
                                        value=call.value[:, kv_heads], mask=mask, probs_heads=None, kwargs=kwargs)
    return dense_attention(one_head_each, frozenset({"probs"}), with_output=False)[1]["probs"]
