"""Plans derived from what a Hugging Face transformers model declares about itself.

A transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) names its
tensor-parallel styles in ``config.base_model_tp_plan`` (``"layers.*.self_attn.q_proj":
"colwise"``, relative to the base model) and ``_tp_plan`` (``{"lm_head":
"colwise_gather_output"}``), and its pipeline structure in ``base_model_pp_plan``
(``embed_tokens`` → ``layers`` → ``norm``, in forward order) and ``_pp_plan``
(``lm_head``). From these the strategy builds a :class:`ParallelPlan` with no plan code.

Under pipeline parallel each stage is the model's own class with a stage forward: the
first stage embeds ``input_ids``, later ones take ``inputs_embeds``; only the last one
applies the final norm and the head. The loss is the model's own ``loss_function``
(labels shifted inside the model, ignore index -100).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_3d.errors import ConfigError
from lightning_3d.loss import IGNORE_INDEX
from lightning_3d.parallel.context_parallel import balanced_positions
from lightning_3d.plans.base import ParallelPlan

# transformers 4.57 / 5.x plan vocabulary → DTensor style. ``replicated_with_grad_allreduce``
# marks per-head norms (q_norm / k_norm) that see this rank's heads only: the weight stays
# whole and its gradient is summed over tp, which is what SequenceParallel on the head dim does.
_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    "replicated_with_grad_allreduce": lambda: SequenceParallel(sequence_dim=-2, use_local_output=True),
}
SUPPORTED_STYLES = tuple(_STYLES)


def is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def find_hf_root(module: nn.Module) -> Optional[str]:
    """The attribute of ``module`` holding a transformers model (the first one found), if any."""
    for name, child in module.named_children():
        if is_hf_model(child):
            return name
    return None


def _style(name: str, style: str, model: nn.Module) -> ParallelStyle:
    if style not in _STYLES:
        raise ConfigError(
            f"{type(model).__name__} declares tensor-parallel style {style!r} for {name!r}, which the strategy does not "
            f"support (supported: {list(SUPPORTED_STYLES)}); use tp=1 or give the module a parallel_plan()"
        )
    return _STYLES[style]()


def _structure(model: nn.Module) -> tuple[str, list[str], str, list[str]]:
    """(base prefix, first-stage modules, blocks, last-stage modules), names relative to ``model``."""
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_prefix, None) if base_prefix else None
    if not isinstance(base, nn.Module):
        base, base_prefix = model, ""
    prefix = f"{base_prefix}." if base_prefix else ""
    pp_plan = list(getattr(base.config, "base_model_pp_plan", None) or getattr(base, "_pp_plan", None) or {})
    blocks = next((name for name in pp_plan if isinstance(getattr(base, name, None), nn.ModuleList)), None)
    if blocks is None:
        raise ConfigError(
            f"{type(model).__name__} declares no base_model_pp_plan with a block list; the strategy can shard it with "
            "data parallel only (tp=pp=cp=1), or give the module a parallel_plan()"
        )
    index = pp_plan.index(blocks)
    first = [prefix + name for name in pp_plan[:index]]
    last = [prefix + name for name in pp_plan[index + 1 :]]
    if base is not model:  # the head's part: the class attribute (an instance's plan is merged with the base's)
        last += list(getattr(type(model), "_pp_plan", None) or {})
    return base_prefix, first, prefix + blocks, last


def tied_to_input(model: nn.Module) -> bool:
    """Whether the output head shares the input embedding's weight."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    embedding, head = get_in(), get_out()
    return embedding is not None and head is not None and getattr(head, "weight", None) is embedding.weight


def hf_plan(model: nn.Module, root: str, tp: int) -> ParallelPlan:
    """The :class:`ParallelPlan` of the transformers model held at ``module.<root>``."""
    base_prefix, first, blocks, last = _structure(model)
    prefix = f"{base_prefix}." if base_prefix else ""
    block_tp: dict[str, ParallelStyle] = {}
    top_tp: dict[str, ParallelStyle] = {}
    if tp > 1:
        base_plan = dict(getattr(model.config, "base_model_tp_plan", None) or {})
        if not base_plan:
            raise ConfigError(
                f"{type(model).__name__} declares no base_model_tp_plan: tensor parallel (tp={tp}) needs one; use tp=1 "
                "or give the module a parallel_plan()"
            )
        block_key = blocks.removeprefix(prefix) + ".*."
        declared = {}  # block module → style name
        for name, style in base_plan.items():
            if name.startswith(block_key):
                declared[name.removeprefix(block_key)] = style
                block_tp[name.removeprefix(block_key)] = _style(name, style, model)
            else:
                top_tp[prefix + name] = _style(name, style, model)
        # per-head norms after a head-sharded (colwise) q_proj see this rank's heads only; plans of
        # older transformers leave them out
        first_block = next(iter(model.get_submodule(blocks).children()))
        for name, _ in first_block.named_modules():
            attention, _, leaf = name.rpartition(".")
            if leaf in ("q_norm", "k_norm") and declared.get(f"{attention}.q_proj") == "colwise" and name not in block_tp:
                block_tp[name] = _style(name, "replicated_with_grad_allreduce", model)
        # a head tied to the embedding stays whole: a sharded tied weight would shard the embedding too
        if not tied_to_input(model):
            for name, style in (getattr(type(model), "_tp_plan", None) or {}).items():
                top_tp[name] = _style(name, style, model)
    tied = tied_to_input(model)
    return ParallelPlan(
        root=root,
        blocks=blocks,
        block_tp=block_tp,
        top_tp=top_tp,
        # a tied embedding/head weight is one parameter: it stays in the root's FSDP unit
        fsdp_units=[] if tied else [first, last] if first and last else [],
        first_stage=first,
        last_stage=last,
        attention="self_attn",
        prepare_stage=_prepare_stage,
        pipeline_loss=hf_loss_sum,
        shifts_labels=True,
        random_free_blocks=float(getattr(model.config, "attention_dropout", 0.0) or 0.0) == 0.0
        and float(getattr(model.config, "hidden_dropout", 0.0) or 0.0) == 0.0,
    )


def hf_shape_problems(model: nn.Module, tp: int, plan: ParallelPlan) -> list[str]:
    """Sizes read from the model's config that tensor parallel must divide."""
    config = getattr(model, "config", None)
    if config is None or tp == 1:
        return []
    name = type(model).__name__
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_key_value_heads": getattr(text, "num_key_value_heads", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
    }
    if any(key.endswith("lm_head") for key in plan.top_tp):
        sizes["vocab_size"] = getattr(text, "vocab_size", None)
    return [
        f"{name}: config.{key}={value} is not divisible by parallel.tp={tp}"
        for key, value in sizes.items()
        if isinstance(value, int) and value % tp
    ]


def context_parallel_problems(model: nn.Module, cp: int) -> list[str]:
    """What the ring attention cannot do for this model."""
    config, name = model.config, type(model).__name__
    problems = []
    if not getattr(model, "_supports_attention_backend", False):
        problems.append(f"{name} does not call attention through transformers' attention interface, which context parallel (cp={cp}) replaces")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and "sliding_attention" in (
        getattr(config, "layer_types", None) or ["sliding_attention"]
    ):
        problems.append(f"{name}: sliding-window attention (config.sliding_window={config.sliding_window}) is not supported with cp={cp}")
    for key in ("attn_logit_softcapping",):
        if getattr(config, key, None):
            problems.append(f"{name}: config.{key}={getattr(config, key)} is not supported with cp={cp}")
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        problems.append(f"{name}: config.attention_dropout={config.attention_dropout} is not supported with cp={cp}")
    return problems


def pipeline_problems(model: nn.Module, pp: int) -> list[str]:
    """What a pipeline stage of this model cannot reproduce."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    problems = []
    layer_types = list(getattr(config, "layer_types", None) or [])
    if len(set(layer_types)) > 1:
        # the base model looks a layer's attention kind up by its position in the stage, not its index
        problems.append(
            f"{type(model).__name__}: layers of different attention kinds ({sorted(set(layer_types))}) cannot be cut "
            f"into pipeline stages (pp={pp}); use pp=1"
        )
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        source = ""
    if "* normalizer" in source:
        # Gemma before transformers 5 scales the embeddings inside the base model's forward, which a
        # later stage (given the previous stage's hidden states as inputs_embeds) would do again
        problems.append(
            f"{type(model).__name__} scales inputs_embeds inside {type(base).__name__}.forward, so a later pipeline stage "
            f"would scale its input again (pp={pp}); use pp=1 or transformers >= 5"
        )
    return problems


# ----------------------------------------------------------------------------- pipeline stages


def _prepare_stage(stage: nn.Module, is_first: bool, is_last: bool) -> None:
    """Give a cut copy of the model a forward from the previous stage's output to the next one's input."""
    base_prefix = getattr(stage, "base_model_prefix", "")
    base = getattr(stage, base_prefix, stage)
    if not is_last and getattr(base, "norm", None) is None and "norm" in base._modules:
        base.norm = nn.Identity()  # the base model applies it unconditionally
    cls = type(stage)
    stage.__class__ = type(f"{cls.__name__}Stage", (cls,), {"forward": _stage_forward, "_stage_ends": (is_first, is_last)})


def _stage_forward(self: nn.Module, hidden: Tensor) -> Tensor:
    is_first, is_last = self._stage_ends
    base = getattr(self, self.base_model_prefix, self)
    # under context parallel every stage computes the positions of the chunks it holds
    cp_rank_size = getattr(self, "context_parallel_rank", None)
    position_ids = balanced_positions(hidden.shape[1], *cp_rank_size, hidden.device) if cp_rank_size else None
    inputs = {"input_ids": hidden} if is_first else {"inputs_embeds": hidden}
    out = base(**inputs, position_ids=position_ids, use_cache=False).last_hidden_state
    return self.get_output_embeddings()(out) if is_last else out


def hf_loss_sum(model: nn.Module, logits: Tensor, labels: Tensor, shifted: bool) -> Tensor:
    """The model's own causal-LM loss as a token sum (its ``loss_function`` with a divisor of 1)."""
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    one = torch.ones((), dtype=torch.float32, device=logits.device)
    if shifted:
        return model.loss_function(logits=logits, labels=None, vocab_size=vocab, shift_labels=labels, num_items_in_batch=one)
    return model.loss_function(logits=logits, labels=labels, vocab_size=vocab, num_items_in_batch=one)


def count_shifted_tokens(labels: Tensor, shifted: bool) -> Tensor:
    """Tokens a causal LM is scored on: its labels after the shift (the last position has no target)."""
    target = labels if shifted else labels[..., 1:]
    return (target != IGNORE_INDEX).sum().double()


def shift_labels(labels: Tensor) -> Tensor:
    """``labels[t + 1]`` at position t, -100 at the end: the shift a causal LM does inside, done before a cut."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def init_rule(model: nn.Module) -> Callable[[nn.Module], None]:
    """The model's own per-module init (``_init_weights``)."""
    return model._init_weights
