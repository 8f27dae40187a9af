"""MoEfication: split each dense SwiGLU feed-forward layer into experts, without training.

`moefy(model, experts=16, top_k=4)` returns a new `Model` whose decoder layers' `mlp` modules are `MoefiedMLP`
blocks shaped like transformers 5.x MoE blocks (`MixtralSparseMoeBlock`): `mlp.gate(h)` returns
`(router_logits, top_k_weights, top_k_index)` and `mlp.experts(h, top_k_index, top_k_weights)` runs the chosen
experts from fused 3-D weights (`gate_up_proj` (experts, 2*d, hidden), `down_proj` (experts, hidden, d)),
dispatched through transformers' `ExpertsInterface` like any HF MoE. Code written for HF MoE models (routers that
hook or replace `mlp.gate`, expert traces, `gate.top_k` changed at run time) works on it unchanged. With
`shared=f` (CMoE's shared expert) a fraction f of each layer's neurons form `mlp.shared_expert`, run for every token
and added to the routed experts' sum (like Qwen2-MoE's `shared_expert`); `experts` then split the rest.

Papers:
  Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts" (reference code
  github.com/thunlp/MoEfication): an FFN is the sum over its intermediate neurons, so a partition of the neurons
  into experts makes the dense FFN exactly the SUM of all experts' outputs; running only the top-k experts
  approximates it. Expert construction by parameter clustering ("weights"): balanced k-means over the
  L2-normalised first-layer weight rows (for SwiGLU: the gate_proj rows). Router ("centroid"): the paper's
  training-free similarity router, scoring expert e by the input's similarity to the mean of that expert's
  normalised rows.
  Pei et al. 2025, "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference" (reference code
  github.com/JarvisPei/CMoE): experts grouped by activation patterns on calibration tokens ("activations"), and
  an analytic router ("cmoe") from one representative neuron per expert (the neuron closest to the cluster
  centre): the score of expert e is |act(x . g_r) * (x . u_r)| with g_r, u_r the representative's L2-normalised
  gate_proj and up_proj rows. Shared expert: the neurons with the highest activation rate (the fraction of
  calibration tokens that have the neuron among their K_a = 10 largest |h|, h = act(x^ . g^) * (x^ . u^) with the
  input and the weight rows L2-normalised) are always on; only the rest are clustered into routed experts.

Departures (also in `MOEFICATION_NOTES`, which `describe()`-style code can show):
  - Outputs are never weighted by router probabilities: every selected expert has weight 1 (MoEfication sums
    the selected experts; CMoE's weights 1 + p * extra_scale start at 1 with extra_scale = 0). `top_k_weights`
    is therefore all ones, so top_k == experts reproduces the dense model exactly.
  - The shared expert is sized as a fraction `shared` of the neurons (CMoE: --nshared expert-sized shared experts
    counted in --nexperts, so CMoE's S2A2E16 is shared=0.125, experts=14, top_k=2 here); `experts` counts the
    routed experts only. Default shared=0 (plain MoEfication: every neuron routed, `experts * d` = intermediate
    size, which code counting "k of E experts = k/E of the FFN" relies on). Ties in the activation rate (neurons
    marked equally often, e.g. never) go to the larger mean |h|; rates are counted on the calibration tokens of
    the one dense pass below, not layer by layer. The shared expert has no gate (weight 1, as the routed ones).
  - Balanced k-means: k-means++ initialisation, then Lloyd iterations whose assignment step is a greedy
    capacity-constrained assignment (neurons take their nearest cluster that still has room, nearest pairs
    first), not MoEfication's KMeansConstrained (min-cost flow) nor CMoE's LAPJV linear assignment.
  - "activations" clusters each neuron's pattern of |act(gate(x)) * up(x)| over the calibration tokens (Euclidean,
    magnitudes kept), not CMoE's binary top-K activation markers with L1 distance (on SmolLM2-135M the magnitudes
    route better than markers or L2-normalised patterns); calibration inputs come from one pass of the dense
    model, not layer by layer through the already-carved layers.
  - The "centroid" router scores x . c_e (c_e the mean of the expert's normalised gate_proj rows), a linear
    router like Mixtral's (`gate.weight`); MoEfication's reference code ranks by -||x/|x| - c_e||, which differs
    from this ranking only by the -||c_e||^2 / 2 term.

Measured (SmolLM2-135M, perplexity of the first 512 tokens of datasets/harbor_town.txt, dense 36.1; experts=16,
seed 0; MLP active fraction = shared + top_k/16 * (1 - shared)): without a shared expert partial top-k is unusable
(top_k=8: 1,800-10,800; top_k=4: 120k-2.2M over the four clustering x router pairs). A shared expert fixes most of
it: shared=0.25 gives 217-322 at top_k=4 (active 0.44) and 80-117 at top_k=8 (0.63); shared=0.5 gives 83-104 at
top_k=4 (0.63) and 54-69 at top_k=8 (0.75); the "centroid" router is best with either clustering (seeds 1, 2
within 10%). At half the FFN, shared=0.25 with experts=12, top_k=4 gives 135-148 (shared=0: 2,300-10,800). The
router beats random experts (shared=0.25, top_k=4: 217 against 343). CMoE's K_a = 10 on normalised h chose
better shared neurons than K_a = 10% of the neurons, than un-normalised h or than mean |h| * |down column|.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations import use_experts_implementation

from workbench.errors import ParameterError, UnsupportedError

CLUSTERINGS = ("weights", "activations")
ROUTERS = ("centroid", "cmoe")
CALIBRATION_TOKENS = 256  # the last this-many tokens of datasets/harbor_town.txt (evaluations read its start)
KMEANS_ITERATIONS = 10
ACTIVATION_MARKERS = 10  # CMoE's K_a (--k-act): the top-|h| neurons per token counted by activation rates

MOEFICATION_NOTES = __doc__.split("Departures", 1)[1]


class MoefiedRouter(nn.Module):
    """The router (`mlp.gate`) of a MoEfied layer, with MixtralTopKRouter's calling convention.

    forward(hidden_states (..., hidden)) -> (router_logits (tokens, experts) in the hidden dtype,
    top_k_weights (tokens, top_k) all ones in the hidden dtype, top_k_index (tokens, top_k) int64), where
    top_k_index are the top-k of router_logits (softmax(router_logits) are the routing probabilities a trace or a
    routing entropy reads). The weights are ones because a MoEfied FFN is the plain sum of its experts (see the
    module docstring): weighting by probabilities would break top_k == experts == dense.

    kind="centroid" (MoEfication's similarity router): logits = x . c_e, `weight` (experts, hidden) holds c_e.
    kind="cmoe" (CMoE's analytic router): logits = |act(x . g_r) * (x . u_r)|, `weight` holds the
    representatives' normalised gate_proj rows g_r and `up_weight` their up_proj rows u_r.

    `top_k` may be changed at run time (1..num_experts).
    """

    def __init__(self, weight: torch.Tensor, top_k: int, kind: str = "centroid",
                 up_weight: torch.Tensor | None = None, act_fn=None):
        super().__init__()
        if kind not in ROUTERS:
            raise ParameterError(f"router {kind!r} is not known; use one of {', '.join(ROUTERS)}")
        self.kind = kind
        self.num_experts, self.hidden_dim = weight.shape
        self.weight = nn.Parameter(weight)
        self.up_weight = nn.Parameter(up_weight) if up_weight is not None else None
        self.act_fn = act_fn
        self.top_k = top_k

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self._top_k = _check_top_k(value, self.num_experts)

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits (tokens, experts) for hidden states (..., hidden)."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.kind == "centroid":
            return F.linear(hidden_states, self.weight)
        return (self.act_fn(F.linear(hidden_states, self.weight)) * F.linear(hidden_states, self.up_weight)).abs()

    def weights_for(self, router_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The mixing weights of an arbitrary expert set index (tokens, k), -1 marking unused slots: 1 for every
        chosen expert, 0 for unused slots, in router_logits' dtype (the hidden dtype): a MoEfied FFN is the plain
        sum of its chosen experts, whoever chose them."""
        return (index >= 0).to(dtype=router_logits.dtype, device=index.device)

    def forward(self, hidden_states: torch.Tensor):
        router_logits = self.scores(hidden_states)
        top_k_index = torch.topk(router_logits, self.top_k, dim=-1).indices
        return router_logits, self.weights_for(router_logits, top_k_index), top_k_index

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_experts={self.num_experts}, top_k={self.top_k}"


@use_experts_implementation
class MoefiedExperts(nn.Module):
    """The experts (`mlp.experts`) of a MoEfied layer, stored like MixtralExperts: expert e computes
    down_proj[e] @ (act(gate_e(x)) * up_e(x)) over its neurons `neuron_index[e]` (rows of the dense gate_proj and
    up_proj, columns of down_proj). forward(hidden_states (tokens, hidden), top_k_index, top_k_weights) sums the
    selected experts' outputs times their weights (all ones from MoefiedRouter)."""

    def __init__(self, config, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, neuron_index: torch.Tensor,
                 act_fn):
        super().__init__()
        self.num_experts, two_d, self.hidden_dim = gate_up_proj.shape
        self.intermediate_dim = two_d // 2
        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        self.register_buffer("neuron_index", neuron_index, persistent=False)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states


class SharedExpert(nn.Module):
    """The always-on part of a MoEfied layer (`mlp.shared_expert`, named like Qwen2-MoE's, without its sigmoid
    gate): the dense SwiGLU restricted to the neurons `neuron_index` (rows of gate_proj and up_proj, columns of
    down_proj), run for every token with weight 1."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                 neuron_index: torch.Tensor, act_fn):
        super().__init__()
        self.intermediate_size, self.hidden_size = gate_proj.shape
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False,
                                   device=gate_proj.device, dtype=gate_proj.dtype)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False,
                                 device=up_proj.device, dtype=up_proj.dtype)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False,
                                   device=down_proj.device, dtype=down_proj.dtype)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_proj)
            self.up_proj.weight.copy_(up_proj)
            self.down_proj.weight.copy_(down_proj)
        self.register_buffer("neuron_index", neuron_index, persistent=False)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class MoefiedMLP(nn.Module):
    """A dense SwiGLU MLP split into experts, shaped like a transformers MoE block (MixtralSparseMoeBlock):
    forward flattens the tokens, calls `self.gate`, then `self.experts`, adds `self.shared_expert` (the CMoE
    shared expert, None without one) and restores the shape."""

    def __init__(self, gate: MoefiedRouter, experts: MoefiedExperts, shared_expert: SharedExpert | None = None):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        self.hidden_size = experts.hidden_dim
        self.intermediate_size = experts.num_experts * experts.intermediate_dim + (
            0 if shared_expert is None else shared_expert.intermediate_size)

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self.gate.top_k = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        output = self.experts(hidden_states, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            output = output + self.shared_expert(hidden_states)
        return output.reshape(shape)


def moefy(model, experts: int = 16, top_k: int = 4, clustering: str = "weights", router: str = "centroid",
          calibration: str | torch.Tensor | list[int] | None = None, seed: int = 0, shared: float = 0.0):
    """A new Model in which every decoder layer's dense SwiGLU `mlp` is a `MoefiedMLP`: optionally a shared expert
    of always-on neurons (CMoE), and `experts` equal routed experts that partition the remaining intermediate
    neurons, `top_k` of them active per token (MoEfication, Zhang et al. 2022; CMoE, Pei et al. 2025; departures
    in the module docstring). The original model is not touched.

    experts     -- number of routed experts per layer; must divide the neurons left after the shared ones
    top_k       -- routed experts active per token, 1..experts (top_k == experts computes exactly the dense
                   model); change it later per layer through `mlp.gate.top_k`
    clustering  -- "weights": balanced k-means over the normalised gate_proj rows (MoEfication's parameter
                   clustering); "activations": balanced k-means over each neuron's |act(gate(x)) * up(x)| pattern
                   on calibration tokens (CMoE's grouping by activation patterns)
    router      -- "centroid": x . mean of the expert's normalised gate_proj rows (MoEfication's similarity
                   router); "cmoe": the activation of the expert's representative neuron (CMoE's analytic router)
    calibration -- text or token ids (a tensor (1, n) or a list) for clustering="activations" and for choosing
                   the shared neurons; None: the last 256 tokens of datasets/harbor_town.txt (evaluations
                   usually read its beginning)
    seed        -- k-means initialisation; the same seed gives the same experts
    shared      -- fraction of each layer's neurons in the shared expert (`mlp.shared_expert`), 0 <= shared < 1,
                   rounded to round(shared * intermediate) neurons: those with the highest CMoE activation rate on
                   the calibration tokens (how often a neuron is among a token's top ACTIVATION_MARKERS by |h|),
                   run for every token with weight 1. 0: no shared expert

    The result's `hf.config.moefication` (and `info["moefication"]`) records experts, top_k, clustering, router,
    seed and shared, so other code can tell the model is MoEfied.
    """
    from workbench.models import wrap

    if clustering not in CLUSTERINGS:
        raise ParameterError(f"clustering {clustering!r} is not known; use one of {', '.join(CLUSTERINGS)}")
    if router not in ROUTERS:
        raise ParameterError(f"router {router!r} is not known; use one of {', '.join(ROUTERS)}")
    started = time.perf_counter()
    intermediate = _dense_mlps(model.hf, model.name)[0][1].gate_proj.out_features
    n_shared = _shared_count(shared, intermediate)
    if calibration is not None and clustering != "activations" and not n_shared:
        raise ParameterError("calibration is only used by clustering='activations' or shared > 0; drop it or "
                             "choose one of those")
    routed = intermediate - n_shared
    allowed = [n for n in range(1, routed + 1) if routed % n == 0]
    if isinstance(experts, bool) or not isinstance(experts, int) or experts not in allowed:
        where = (f"the {routed} neurons left after shared={shared!r} ({n_shared} of {intermediate})" if n_shared
                 else f"the intermediate size {intermediate}")
        raise ParameterError(f"experts={experts!r} must divide {where}; allowed: {', '.join(map(str, allowed))}")
    _check_top_k(top_k, experts)
    hf = copy.deepcopy(model.hf)
    mlps = _dense_mlps(hf, model.name)

    needs_inputs = clustering == "activations" or n_shared > 0
    inputs = _calibration_inputs(model, hf, mlps, calibration) if needs_inputs else None
    generator = torch.Generator().manual_seed(seed)
    for index, (name, mlp) in enumerate(mlps):
        x = None if inputs is None else inputs[index]
        shared_neurons = shared_neurons_by_activation_rate(mlp, x, n_shared) if n_shared else None
        keep = torch.ones(intermediate, dtype=torch.bool)
        if shared_neurons is not None:
            keep[shared_neurons] = False
        neurons = keep.nonzero().squeeze(1)  # the routed neurons, ascending
        features = _features(mlp, clustering, x)[neurons]
        labels, centers = balanced_kmeans(features, experts, generator)
        parent_name, _, child = name.rpartition(".")
        hf.get_submodule(parent_name).__setattr__(child, _build(hf.config, mlp, neurons, labels, centers, features,
                                                                top_k, router, shared_neurons))
    if getattr(hf.config, "_experts_implementation", None) is None:
        hf.config._experts_implementation = "eager"  # a MoefiedExperts must find an implementation to dispatch to
    description = {"experts": experts, "top_k": top_k, "clustering": clustering, "router": router, "seed": seed,
                   "shared": float(shared)}
    hf.config.moefication = dict(description)
    label = f"e{experts}k{top_k}" + (f"s{float(shared):g}" if n_shared else "")
    moefied = wrap(hf, model.tokenizer, name=f"{model.name} moefied {label}")
    moefied.info = {**model.info, "moefication": description, "moefy_seconds": time.perf_counter() - started}
    return moefied


def _shared_count(shared, intermediate: int) -> int:
    """The number of shared neurons for the fraction `shared` of `intermediate` neurons."""
    if isinstance(shared, bool) or not isinstance(shared, (int, float)) or not 0 <= shared < 1:
        raise ParameterError(f"shared={shared!r} must be a fraction of the neurons in [0, 1)")
    count = round(shared * intermediate)
    if shared > 0 and count == 0:
        raise ParameterError(f"shared={shared!r} is less than one of the {intermediate} neurons; use 0 for no "
                             f"shared expert or at least {1 / intermediate:.2g}")
    return count


def activation_rates(h: torch.Tensor, k: int) -> torch.Tensor:
    """CMoE's activation rate of each neuron (n,) from activations h (tokens, n): the fraction of tokens for which
    the neuron is among that token's top-k by |h|."""
    markers = torch.zeros_like(h, dtype=torch.float32)
    markers.scatter_(1, h.abs().topk(min(k, h.shape[1]), dim=1).indices, 1.0)
    return markers.mean(0)


def shared_neurons_by_activation_rate(mlp, inputs: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` neurons (ascending, on CPU) of one dense mlp with the highest CMoE activation rate on its
    calibration inputs (tokens, hidden). As in CMoE, h = act(x^ . g^) * (x^ . u^) with x, the gate_proj rows g and
    the up_proj rows u L2-normalised; ties in the rate (neurons never or equally often marked) go to the larger
    mean |h|."""
    with torch.no_grad():
        x = F.normalize(inputs.float(), dim=1)
        h = (mlp.act_fn(x @ F.normalize(mlp.gate_proj.weight.float(), dim=1).T)
             * (x @ F.normalize(mlp.up_proj.weight.float(), dim=1).T)).cpu()
    rates = activation_rates(h, ACTIVATION_MARKERS)
    order = torch.argsort(h.abs().mean(0), descending=True, stable=True)
    order = order[torch.argsort(rates[order], descending=True, stable=True)]
    return order[:count].sort().values


def balanced_kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
                    iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means of points (n, dim), n divisible by k: labels (n,) with every cluster of size n // k, and
    the centres (k, dim). k-means++ initialisation from `generator`, then Lloyd iterations with a greedy
    capacity-constrained assignment step; the assignment of lowest inertia is kept."""
    n = points.shape[0]
    norms = points.square().sum(1, keepdim=True)
    centers = _kmeans_plus_plus(points, norms, k, generator)
    best_labels, best_inertia, labels = None, float("inf"), None
    for _ in range(iterations):
        distances = _squared_distances(points, norms, centers)
        new_labels = balanced_assignment(distances, n // k)
        inertia = distances.gather(1, new_labels[:, None]).sum().item()
        if inertia < best_inertia:
            best_labels, best_inertia = new_labels, inertia
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centers = _cluster_means(points, labels, k)
    return best_labels, _cluster_means(points, best_labels, k)


def _squared_distances(points: torch.Tensor, norms: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances from points (n, dim) with squared norms (n, 1) to centers (k, dim),
    through one matrix product (torch.cdist was ~100x slower here for these shapes on a busy 2-core CPU)."""
    return (norms - 2 * points @ centers.T + centers.square().sum(1)).clamp_min(0)


def _cluster_means(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    one_hot = F.one_hot(labels, k).to(points.dtype)  # (n, k)
    return (one_hot.T @ points) / one_hot.sum(0)[:, None].clamp_min(1)


def balanced_assignment(distances: torch.Tensor, capacity: int) -> torch.Tensor:
    """Labels (n,) assigning each row of distances (n, k) (or any increasing function of them) to a column, at
    most `capacity` rows per column: in rounds, each unassigned row proposes its nearest column that still has
    room and each column accepts its nearest proposals up to its remaining room (a greedy, nearest-pairs-first
    approximation of the optimal balanced assignment)."""
    n, k = distances.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while (labels < 0).any():
        rows = (labels < 0).nonzero().squeeze(1)
        open_distances = distances[rows].masked_fill((room == 0)[None, :], float("inf"))
        best, choice = open_distances.min(dim=1)
        order = torch.argsort(best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # grouped by column, nearest first
        chosen = choice[order]
        counts = torch.bincount(chosen, minlength=k)
        rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[chosen]
        accepted = rank < room[chosen]
        labels[rows[order[accepted]]] = chosen[accepted]
        room -= torch.bincount(chosen[accepted], minlength=k)
    return labels


def _kmeans_plus_plus(points: torch.Tensor, norms: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    chosen = [torch.randint(points.shape[0], (1,), generator=generator).item()]
    nearest = _squared_distances(points, norms, points[chosen]).squeeze(1)
    for _ in range(1, k):
        weights = nearest.clone()
        weights[chosen] = 0
        if weights.sum() <= 0:  # fewer distinct points than clusters: any unchosen point will do
            weights = torch.ones_like(weights).index_fill_(0, torch.tensor(chosen), 0)
        chosen.append(torch.multinomial(weights, 1, generator=generator).item())
        nearest = torch.minimum(nearest, _squared_distances(points, norms, points[chosen[-1:]]).squeeze(1))
    return points[chosen].clone()


def _features(mlp, clustering: str, inputs: torch.Tensor | None) -> torch.Tensor:
    """The points clustered for one layer (intermediate, dim), float32 on CPU: normalised gate_proj rows, or each
    neuron's |act(gate(x)) * up(x)| over the calibration tokens."""
    if clustering == "weights":
        return F.normalize(mlp.gate_proj.weight.detach().float().cpu(), dim=1)
    with torch.no_grad():
        x = inputs.float()
        activations = mlp.act_fn(x @ mlp.gate_proj.weight.float().T) * (x @ mlp.up_proj.weight.float().T)
    return activations.abs().T.contiguous().cpu()


def _build(config, mlp, neurons: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, features: torch.Tensor,
           top_k: int, router: str, shared_neurons: torch.Tensor | None = None) -> MoefiedMLP:
    """The MoefiedMLP for one dense mlp whose routed neurons `neurons` (ascending) have k-means labels and
    features (rows matching `neurons`): experts ordered by their lowest neuron, neurons ascending in each, and
    the shared expert of `shared_neurons` (None: none)."""
    k = centers.shape[0]
    groups = [(labels == e).nonzero().squeeze(1) for e in range(k)]  # positions in `neurons`
    order = sorted(range(k), key=lambda e: groups[e][0].item())
    positions = torch.stack([groups[e] for e in order])  # (experts, d), each row sorted
    neuron_index = neurons[positions]
    centers = centers[order]
    gate_w, up_w, down_w = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                            mlp.down_proj.weight.detach())
    device_index = neuron_index.to(gate_w.device)
    gate_up = torch.cat([gate_w[device_index], up_w[device_index]], dim=1)  # (experts, 2d, hidden)
    down = down_w[:, device_index].permute(1, 0, 2).contiguous()  # (experts, hidden, d)
    if router == "centroid":
        rows = F.normalize(gate_w.float(), dim=1)[device_index]  # (experts, d, hidden)
        gate = MoefiedRouter(rows.mean(1).to(gate_w.dtype), top_k, "centroid")
    else:
        # representative: the neuron closest to its cluster centre in the clustering's feature space
        distances = (features[positions] - centers[:, None, :]).square().sum(-1)  # (experts, d)
        representatives = neuron_index.gather(1, distances.argmin(1, keepdim=True)).squeeze(1).to(gate_w.device)
        gate = MoefiedRouter(F.normalize(gate_w[representatives].float(), dim=1).to(gate_w.dtype), top_k, "cmoe",
                             up_weight=F.normalize(up_w[representatives].float(), dim=1).to(gate_w.dtype),
                             act_fn=mlp.act_fn)
    shared_expert = None
    if shared_neurons is not None:
        index = shared_neurons.to(gate_w.device)
        shared_expert = SharedExpert(gate_w[index], up_w[index], down_w[:, index], index, mlp.act_fn)
    return MoefiedMLP(gate, MoefiedExperts(config, gate_up.contiguous(), down, neuron_index.to(gate_w.device),
                                           mlp.act_fn), shared_expert)


def _dense_mlps(hf, label: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every dense SwiGLU mlp (gate_proj, up_proj, down_proj without bias)."""
    found = [(name, module) for name, module in hf.named_modules()
             if name.endswith("mlp") and all(isinstance(getattr(module, p, None), nn.Linear)
                                             for p in ("gate_proj", "up_proj", "down_proj"))]
    if not found:
        raise UnsupportedError(f"moefy needs dense SwiGLU MLPs (mlp.gate_proj/up_proj/down_proj); model {label!r} "
                               "has none (already a mixture of experts?)")
    if any(getattr(module, p).bias is not None for _, module in found for p in ("gate_proj", "up_proj", "down_proj")):
        raise UnsupportedError(f"moefy supports MLPs without biases; model {label!r} has biased projections")
    return found


def _calibration_inputs(model, hf, mlps, calibration) -> list[torch.Tensor]:
    """Each dense mlp's input (tokens, hidden) for the calibration tokens, from one forward of the dense copy."""
    if calibration is None:
        from workbench.eval.data import read_text

        ids = model.tokenizer(read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids[:, -CALIBRATION_TOKENS:]
    elif isinstance(calibration, str):
        ids = model.tokenizer(calibration, add_special_tokens=False, return_tensors="pt")["input_ids"]
    elif isinstance(calibration, (torch.Tensor, list, tuple)):
        ids = torch.as_tensor(calibration).reshape(1, -1).long()
    else:
        raise ParameterError(f"calibration must be text, token ids or None, got {type(calibration).__name__}")
    if ids.shape[1] < 1:
        raise ParameterError("calibration holds no tokens")
    captured: list[torch.Tensor] = [None] * len(mlps)

    def keep(i):
        return lambda _module, args: captured.__setitem__(i, args[0].detach().reshape(-1, args[0].shape[-1]))

    hooks = [mlp.register_forward_pre_hook(keep(i)) for i, (_, mlp) in enumerate(mlps)]
    try:
        with torch.no_grad():
            hf(input_ids=ids.to(next(hf.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _check_top_k(top_k, experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ParameterError(f"top_k={top_k!r} must be an integer in 1..{experts} (the number of experts)")
    return top_k
