"""The trace schema: every recordable variable, declared once.

A declaration says what a variable is called, its dimensions, units and meaning, which `record=` option turns it
on (None: always recorded) and where its values come from. Everything else is generated from the declarations:
the recorder stores values under these names along the variable's axis (`step`, `forward`, or once per run), the
xarray Dataset gets them with these dimensions and attributes, `RECORDABLE` lists the options, the plots name the
option that would have recorded a missing variable, and the README's table is `markdown_table()`.

Every variable's first dimension is `sequence` (runs are batch 1 today; the axis is there so that batched runs
need no new schema). Components declare their own variables with `declare(...)` (a decoder's acceptance
telemetry, a router's expert ids) and write them through the run's recorder (`ctx.record(name, value)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import ParameterError

AXES = ("step", "forward")  # the dimensions values arrive along, one entry at a time


@dataclass(frozen=True)
class Option:
    """A `record=` option: a name and what it turns on."""

    name: str
    description: str


@dataclass(frozen=True)
class Variable:
    name: str
    dims: tuple[str, ...]  # without the leading "sequence"
    units: str
    description: str
    record: str | None  # the record= option that turns it on; None: always recorded
    source: str  # where the values come from
    dtype: str = "float32"
    fill: float = 0.0  # what pads a ragged trailing `position` dimension (NaN: not seen yet)

    @property
    def axis(self) -> str | None:
        """The dimension values arrive along ("step" or "forward"), or None for a value set once per run."""
        return next((d for d in self.dims if d in AXES), None)

    @property
    def full_dims(self) -> tuple[str, ...]:
        return ("sequence", *self.dims)


OPTIONS: dict[str, Option] = {}
VARIABLES: dict[str, Variable] = {}


def option(name: str, description: str) -> Option:
    """Declare a `record=` option."""
    if name in OPTIONS and OPTIONS[name].description != description:
        raise ValueError(f"record option {name!r} is already declared")
    OPTIONS[name] = Option(name, description)
    return OPTIONS[name]


def declare(name: str, dims: tuple[str, ...], units: str, description: str, record: str | None, source: str,
            dtype: str = "float32", fill: float = 0.0) -> Variable:
    """Declare a trace variable (see the module docstring). Declaring the same variable again is a no-op; a
    different declaration under a taken name is an error."""
    if record is not None and record not in OPTIONS:
        raise ValueError(f"variable {name!r}: record option {record!r} is not declared (use schema.option first)")
    variable = Variable(name, tuple(dims), units, description, record, source, dtype, fill)
    if name in VARIABLES and VARIABLES[name] != variable:
        raise ValueError(f"trace variable {name!r} is already declared differently")
    VARIABLES[name] = variable
    return variable


def variables(options: frozenset[str] | set[str]) -> list[Variable]:
    """The variables a run recording `options` produces (always-recorded ones included), in declaration order."""
    return [v for v in VARIABLES.values() if v.record is None or v.record in options]


def recorded_by(name: str) -> str | None:
    """The record= option that produces variable `name` (None: always there, or unknown)."""
    variable = VARIABLES.get(name)
    return None if variable is None else variable.record


def check_options(names) -> list[str]:
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise ParameterError(f"cannot record {', '.join(map(repr, unknown))}; recordable: {', '.join(OPTIONS)}")
    return list(names)


def markdown_table() -> str:
    """The README's table of trace variables, generated from the declarations."""
    lines = ["| variable | dims | units | with | meaning |", "|---|---|---|---|---|"]
    for v in VARIABLES.values():
        lines.append(f"| `{v.name}` | {', '.join(v.full_dims)} | {v.units} | {v.record or 'always'} | "
                     f"{v.description} |")
    return "\n".join(lines)


# -- the core declarations ------------------------------------------------------------------------------------
option("entropy", "next-token entropy per step; attention entropy per step, layer and head (and for the prompt rows)")
option("attention", "attention rows over positions per step for chosen layers and heads, and the prompt's matrix")
option("logits", "the full next-token logits at every step")
option("cache", "bytes the KV cache holds, tokens held per layer and KV head, and which positions were evicted when")
option("fidelity", "against dense attention and a dense full-cache run: attention recall and output error per step, "
                   "layer and head, and the KL divergence of each step's next-token distribution")

RUN = "the generation loop"
declare("step_seconds", ("step",), "seconds", "wall time of the step that chose this token (its forward passes and "
        "the choice; step 0 includes the prefill)", None, RUN, "float64")
declare("forward_seconds", ("forward",), "seconds", "wall time of each forward pass", None, "the session", "float64")
declare("forward_phase", ("forward",), "", "the pass's phase: prefill, decode, verify, rollout or append", None,
        "the session", "str")
declare("forward_start", ("forward",), "position", "position of the pass's first token", None, "the session",
        "int64")
declare("forward_tokens", ("forward",), "tokens", "tokens the pass fed", None, "the session", "int64")
declare("entropy", ("step",), "nats", "Shannon entropy of the next-token distribution this token was chosen from",
        "entropy", "the step's logits (fused Triton softmax-entropy kernel on GPU), computed once per step")
declare("attention_entropy", ("step", "layer", "head"), "nats", "entropy of the attention row of the query that "
        "chose this token", "entropy", "the attention variant (flash: inside the kernel; others: dense recomputation)")
declare("prompt_attention_entropy", ("layer", "head", "query"), "nats", "entropy of each prompt query's attention "
        "row (prefill)", "entropy", "the attention variant, at the prefill")
declare("attention", ("step", "attn_layer", "attn_head", "position"), "probability", "attention row of the query "
        "that chose this token, over positions (NaN: not yet seen; evicted positions 0)", "attention",
        "the attention variant, mapped from cache slots to positions", fill=float("nan"))
declare("prompt_attention", ("attn_layer", "attn_head", "query", "position"), "probability", "prefill attention "
        "matrix: prompt queries x positions", "attention", "the attention variant, at the prefill", fill=float("nan"))
declare("logits", ("step", "vocab"), "logit", "next-token logits this token was chosen from", "logits", RUN)
declare("cache_bytes", ("step",), "bytes", "bytes the KV cache's key/value buffers occupy after this step", "cache",
        "the cache's stores (KVCache.nbytes)", "int64")
declare("cache_part_bytes", ("step", "cache_part"), "bytes", "cache_bytes by what occupies them (coordinate "
        "cache_part): `dense` buffers of a float cache; a quantized one's packed `codes`, `scales`, `zeros` and "
        "full-precision `residual`; a store's own parts", "cache", "the cache's stores (KVCache.nbytes_by_component)",
        "int64")
declare("kv_quant_error", ("step", "layer", "kv_head", "side"), "fraction", "relative quantization error "
        "||x - x_hat|| / ||x|| of the keys (side key) and values (side value) the layer and KV head have quantized so "
        "far (NaN: none yet); only for quantized caches", "cache", "the quantized stores, measured as they quantize",
        fill=float("nan"))
declare("cache_tokens", ("step", "layer", "kv_head"), "tokens", "tokens held per layer and KV head after this step",
        "cache", "the cache's stores", "int64")
declare("cache_evicted_at", ("layer", "kv_head", "position"), "step", "the step during which the cache evicted this "
        "position (-1: never evicted)", "cache", "the cache's eviction log", "int32", -1)
declare("cache_merged_into", ("layer", "kv_head", "position"), "position", "the kept position an evicted entry was "
        "merged into (-1: dropped, or kept)", "cache", "the cache's eviction log", "int32", -1)
declare("attention_recall", ("step", "layer", "head"), "fraction", "share of dense attention mass on the keys the "
        "variant kept (mean over the step's queries; NaN for variants without a kept set)", "fidelity",
        "a dense recomputation of each attention call")
declare("attention_output_error", ("step", "layer", "head"), "relative L2", "|attention output - dense output| / "
        "|dense output| (mean over the step's queries)", "fidelity", "a dense recomputation of each attention call")
declare("prompt_attention_recall", ("layer", "head", "query"), "fraction", "attention recall of each prompt query "
        "row (prefill)", "fidelity", "a dense recomputation at the prefill")
declare("kl_vs_dense", ("step",), "nats", "KL(dense full-cache model || this run) of the next-token distribution at "
        "this step", "fidelity", "a teacher-forced replay of the run's tokens through the unmodified model")
declare("cache_dropped_mass", ("step", "layer", "head"), "fraction", "share of the dense full-cache model's attention "
        "at this step that falls on positions the cache had evicted", "fidelity", "the same dense replay")

option("routing", "MoE routing per step and layer (experts chosen, their weights, the router's entropy) and for the "
                  "prompt rows")
option("router_logits", "the MoE routers' logits over every expert per step and layer")
ROUTERS = "the router bridge (each MoE router's output, after the run's router component)"
declare("expert_ids", ("step", "layer", "rank"), "expert", "experts the query that chose this token (the token "
        "before it) was sent to at each layer, highest router logit first (-1: a dense layer, or fewer experts)",
        "routing", ROUTERS, "int64", -1)
declare("expert_weights", ("step", "layer", "rank"), "weight", "the mixing weight of each expert in expert_ids "
        "(NaN where there is none)", "routing", ROUTERS, fill=float("nan"))
declare("router_entropy", ("step", "layer"), "nats", "entropy of softmax(router logits) over all experts (NaN: a "
        "dense layer)", "routing", ROUTERS)
declare("prompt_expert_ids", ("query", "layer", "rank"), "expert", "expert_ids of each prompt token (prefill)",
        "routing", ROUTERS, "int64", -1)
declare("prompt_expert_weights", ("query", "layer", "rank"), "weight", "expert_weights of each prompt token "
        "(prefill)", "routing", ROUTERS, fill=float("nan"))
declare("prompt_router_entropy", ("query", "layer"), "nats", "router_entropy of each prompt token (prefill)",
        "routing", ROUTERS)
declare("fate_expert_ids", ("step", "layer", "rank"), "expert", "Fate's prediction of expert_ids: the previous MoE "
        "layer's router input through this layer's router (-1: the first MoE layer, dense layers)", "routing", ROUTERS,
        "int64", -1)
declare("prompt_fate_expert_ids", ("query", "layer", "rank"), "expert", "fate_expert_ids of each prompt token "
        "(prefill)", "routing", ROUTERS, "int64", -1)
declare("router_logits", ("step", "layer", "expert"), "logit", "the router's logits over all experts for the query "
        "that chose this token (NaN: a dense layer)", "router_logits", ROUTERS, fill=float("nan"))

option("layers", "per step and decoder layer: the logit lens (the layer's output through the final norm and LM head: "
                 "its top token and KL from the model's distribution), how much the layer changed the hidden state, "
                 "and which layers the pass skipped; the prompt's similarities too")
LAYERS = "the layer bridge (each decoder layer's input and output)"
declare("lens_token", ("step", "layer"), "token id", "the logit lens's top token at each layer for the query that "
        "chose this token (the last layer's is the model's own top token)", "layers", LAYERS, "int64", -1)
declare("lens_kl", ("step", "layer"), "nats", "KL(the model's next-token distribution || the logit lens at this "
        "layer) for the query that chose this token (0 at the last layer)", "layers", LAYERS)
declare("layer_similarity", ("step", "layer"), "cosine", "cosine similarity of the layer's input and output hidden "
        "state for the query that chose this token (1: the layer changed nothing; ShortGPT's Block Influence is 1 "
        "minus it)", "layers", LAYERS)
declare("layer_skipped", ("step", "layer"), "", "1 where the pass that chose this token skipped the layer (a layer "
        "router, or a self-speculative draft), else 0", "layers", LAYERS, "int64", -1)
declare("prompt_layer_similarity", ("query", "layer"), "cosine", "layer_similarity of each prompt token (prefill)",
        "layers", LAYERS)
