"""How much memory a job needs per process, predicted from the model's `config.json` alone.

`plan(spec, shape, processes, device)` gives, for each phase (`basis`, `importance`,
`finetune`), what is resident when it starts (this process's share of the loaded model) and
what the phase adds at its peak. `metrics.json` measures the same two ways
(`warp_core.memory`): on CUDA `resident + added` (`torch.cuda.max_memory_allocated`), on the
CPU `added` alone (the rise of peak RSS over the RSS at the phase's start).

A phase's peak is the largest of its *moments*: points at which a known set of tensors is
alive together (the backward pass of a step's last micro-batch, the optimizer step, the
checkpoint save...). A moment is a sum of *terms*, each one kind of tensor the code holds,
sized from the model's shapes and the spec's settings; each term's function says which code
holds it and until when. Activations are counted tensor by tensor for a Llama-style decoder
layer (RMSNorm, rotary attention through SDPA, gated MLP: the Llama, Mistral and Qwen
families), as autograd saves them (checked with `torch.autograd.graph.saved_tensors_hooks`);
the whole plan is checked against real runs in `bench/plan_accuracy.py`.

Shapes come from the model built on the meta device (no weights, no memory): exact parameter
shapes for any architecture transformers knows, the targets through `model.find_targets`, and
which targets share a basis through `basis.group_by_input` on a meta forward pass, so the
planner groups exactly as Phase 1 does rather than guessing from module names (o_proj reads
an input as wide as q/k/v's, but another one).

Every sequence is counted at `max_length` tokens with every position after the first a
response token: the data are not read, so the plan bounds any data the spec allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from warp_core.basis import group_by_input
from warp_core.loss import HEAD_CHUNK_TOKENS
from warp_core.model import (
    find_targets,
    resolve_dtype,
    resolve_gradient_checkpointing,
    resolve_keep_rotated,
)
from warp_core.rotation import from_activations
from warp_core.slots import BLOCK_ELEMENTS
from warp_core.spec import JobSpec

GIB = 2**30
GPU_SIZES_GIB = (24, 40, 48, 80, 94, 141, 192)
"""The GPU memory sizes `warp plan` checks a job against (GiB per GPU)."""

KEPT_FREE = 0.05
"""Share of a GPU's memory a plan leaves unused. The plan predicts what
`torch.cuda.max_memory_allocated` reports, which leaves out the CUDA context and kernels
(about 0.5 GiB), cuBLAS and NCCL workspaces, and what PyTorch's caching allocator holds but
cannot hand out (fragmentation, a few percent of a training job's peak): 4 GiB of 80."""

FP32 = 4

EIGH_BYTES_PER_ENTRY = 34
"""`basis.eigenbasis` of an n x n moment, beyond the moment: the fp64 copy it decomposes
(8 n^2), eigh's fp64 vectors (8 n^2) and LAPACK's syevd workspace (2 n^2 doubles, 16 n^2)
at once, then the flipped copy and the fp32 result. Measured 33.7 n^2 bytes for n = 4096,
the result included (`bench/plan_accuracy.py --calibrate`)."""

FIRST_FORWARD_BYTES = 14 * 2**20
FIRST_BACKWARD_BYTES = 12 * 2**20
"""What a process keeps from its first forward pass and its first backward pass: kernels,
thread pools and caches set up at first use (measured on the CPU: 13 and 12 MiB,
`bench/plan_accuracy.py --calibrate`; on CUDA cuBLAS's workspaces are of that order)."""

STEP_BYTES_PER_COEFFICIENT = 16
"""What `finetune.step_slots` holds for one block beyond the state, per coefficient: the
block's gradient in fp32 and its rotation (8), the mask expanded to bytes with its complement
(3), the trainable entries it selects (4 (1 - keep_ratio)); the write-back's fp32 delta, W0
in fp32 and their product (12) come after the first are freed."""

LOSS_BYTES_PER_LOGIT = 12
"""Per response token and vocabulary entry at the start of the backward pass: the fp32
log-softmax that cross-entropy saves, the gradient reaching it and the gradient it passes
back to the fp32 logits (`loss.response_loss_sum`; 4 bytes each)."""


# -- the model's shapes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    """A parameter as the planner sees it: `rows` x `columns` (a vector is rows x 1). FSDP2
    shards rows like `torch.chunk`: process 0, the one with most, holds `ceil(rows / N)`."""

    name: str
    rows: int
    columns: int

    @property
    def numel(self) -> int:
        return self.rows * self.columns

    def here(self, processes: int) -> int:
        """Elements process 0 holds when `processes` share the weight by rows."""
        return math.ceil(self.rows / processes) * self.columns


@dataclass(frozen=True)
class TargetShape(Weight):
    """A WaRP target's `out x in` weight, the basis it reads, and whether it is the head
    (which sees only response positions in Phase 3)."""

    basis: str = ""
    head: bool = False


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model, read from its config on the meta device."""

    weights: tuple[Weight, ...]
    """Every parameter once (a tied head is the embeddings' weight)."""
    targets: tuple[TargetShape, ...]
    bases: dict[str, int]
    """Basis key -> n: one n x n basis per distinct input the targets read."""
    tied_head: Weight | None
    """The output head when it shares the embeddings' weight (untying copies it)."""
    layers: int
    layer_params: int
    """Parameters of the largest decoder layer: an FSDP2 unit (`World.shard`)."""
    decoder_params: int
    """The decoder's own parameters outside its layers (embeddings, final norm): a unit."""
    hidden: int
    intermediate: int
    heads: int
    attention_width: int
    """heads x head_dim: queries, keys and values repeated to every head, attention output."""
    vocab: int


def read_shape(base_model: str, target_modules: list[str], local_only: bool = False) -> ModelShape:
    """The shapes of `base_model` (a local directory holding at least config.json, or a Hub
    id), its model built on the meta device: only the config is read. `local_only` never
    reaches a hub (a Hub id must then be in the local cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        base_model, trust_remote_code=False, local_files_only=local_only
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return model_shape(model, target_modules)


def model_shape(model: nn.Module, target_modules: list[str]) -> ModelShape:
    """The shapes of a model (on the meta device or not) for `target_modules`."""
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    found = find_targets(model, target_modules)
    probe = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=head.weight.device)}
    groups = group_by_input(model, found, probe)
    key_of = {t.name: key for key, members in groups.items() for t in members}
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        weights=tuple(_weight(name, p) for name, p in model.named_parameters()),
        targets=tuple(
            TargetShape(
                t.param_name,
                t.module.out_features,
                t.module.in_features,
                basis=key_of[t.name],
                head=t.module is head,
            )
            for t in found
        ),
        bases={key: members[0].module.in_features for key, members in groups.items()},
        tied_head=_weight(f"{_name_of(model, head)}.weight", head.weight) if tied else None,
        layers=len(layers),
        layer_params=max((_count(layer.parameters()) for layer in layers), default=0),
        decoder_params=_count(
            p for p in model.get_decoder().parameters() if id(p) not in in_layers
        ),
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        heads=heads,
        attention_width=heads * head_dim,
        vocab=config.vocab_size,
    )


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _weight(name: str, param: torch.Tensor) -> Weight:
    rows = param.shape[0] if param.dim() else 1
    return Weight(name, rows, param.numel() // max(rows, 1))


def _count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# -- what a plan says -----------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One kind of tensor a moment holds, in bytes per process."""

    name: str
    bytes: int


@dataclass(frozen=True)
class Moment:
    """The terms alive together at one point of a phase."""

    name: str
    terms: tuple[Term, ...]

    @property
    def bytes(self) -> int:
        return sum(term.bytes for term in self.terms)


@dataclass(frozen=True)
class PhasePlan:
    """One phase on one process: the model resident when it starts, and its moments."""

    name: str
    resident: int
    moments: tuple[Moment, ...]

    @property
    def peak_moment(self) -> Moment:
        return max(self.moments, key=lambda moment: moment.bytes)

    @property
    def added(self) -> int:
        """What the phase adds at its peak: the CPU figure of `metrics.json`."""
        return self.peak_moment.bytes

    @property
    def peak(self) -> int:
        """Resident plus added: the CUDA figure of `metrics.json`."""
        return self.resident + self.added

    def as_dict(self) -> dict[str, Any]:
        moment = self.peak_moment
        return {
            "resident": self.resident,
            "added": self.added,
            "peak": self.peak,
            "peak_moment": moment.name,
            "terms": {term.name: term.bytes for term in moment.terms},
        }


@dataclass(frozen=True)
class Plan:
    """A job's predicted memory per process (process 0, the one holding most)."""

    method: str
    processes: int
    device: str
    dtype: str
    phases: tuple[PhasePlan, ...]

    @property
    def largest(self) -> PhasePlan:
        """The phase with the highest peak: what a GPU must hold."""
        return max(self.phases, key=lambda phase: phase.peak)

    @property
    def peak(self) -> int:
        return self.largest.peak

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "processes": self.processes,
            "device": self.device,
            "dtype": self.dtype,
            "phases": {phase.name: phase.as_dict() for phase in self.phases},
            "peak": {"phase": self.largest.name, "bytes": self.peak},
        }


def plan(
    spec: JobSpec, shape: ModelShape, processes: int | None = None, device: str = "cuda"
) -> Plan:
    """The memory plan of `spec` on `processes` (default: its `resources.gpus`) processes of
    `device` ("cuda" or "cpu"); phases the method does not run are left out."""
    job = _Job(spec, shape, processes or spec.resources.gpus, torch.device(device))
    phases = [job.basis(), job.importance(), job.finetune()] if job.warp else [job.finetune()]
    return Plan(
        spec.method, job.n, job.device.type, str(job.dtype).removeprefix("torch."), tuple(phases)
    )


# -- the terms -------------------------------------------------------------------------------


class _Job:
    """One spec on one model shape, in `n` processes on `device`: every term of its plan.

    Sizes are per process: FSDP2 shards parameters and WaRP's per-weight state by rows,
    while bases (whole or a row shard, see `bases`), Phase 1's moments and Phase 2's scores
    are held whole by every process. Phases 1 and 2 deal whole batches to processes, Phase 3
    splits each micro-batch between them (`finetune._share`).
    """

    def __init__(self, spec: JobSpec, shape: ModelShape, processes: int, device: torch.device):
        hp = spec.hyperparameters
        self.hp, self.shape, self.n, self.device = hp, shape, processes, device
        self.warp = spec.method == "warp"
        self.evaluates = spec.eval.enabled
        self.cuda = device.type == "cuda"
        self.dtype = resolve_dtype(hp.dtype, device)
        self.b = self.dtype.itemsize
        self.s = 4 if hp.optimizer_state_dtype == "float32" else 2
        self.recompute = resolve_gradient_checkpointing(hp.gradient_checkpointing, device)
        clipped = hp.max_grad_norm is not None
        self.keep = clipped and resolve_keep_rotated(hp.keep_rotated_gradients, device)
        self.untied = shape.tied_head is not None and (
            "lm_head" in hp.target_modules or processes > 1
        )
        target_names = {t.name for t in shape.targets}
        self.others = (
            [w for w in self.parameters if w.name not in target_names]
            if hp.train_other_params
            else []
        )

    # -- shared sizes ------------------------------------------------------------------

    def here(self, weights: Iterable[Weight]) -> int:
        return sum(w.here(self.n) for w in weights)

    @property
    def targets_here(self) -> int:
        return self.here(self.shape.targets)

    @property
    def state_entries(self) -> int:
        """Entries of trained state on this process: a WaRP target holds them only at its
        unfrozen coefficients (`RotatedSlot`), a plainly trained weight at every one."""
        targets = self.targets_here
        if self.warp:
            targets = math.ceil(targets * (1 - self.hp.keep_ratio))
        return targets + self.here(self.others)

    def on_device(self, what: str) -> bool:
        """Whether state `what` is on the job's device: offloaded state is in host memory,
        which on the CPU is the same memory."""
        return not (self.cuda and what in self.hp.offload)

    def micro_tokens(self) -> tuple[int, int]:
        """(tokens, response tokens) of this process's share of a Phase 3 micro-batch."""
        sequences = math.ceil(self.hp.batch_size / self.n)
        return sequences * self.hp.max_length, sequences * (self.hp.max_length - 1)

    # -- the phases --------------------------------------------------------------------

    @property
    def parameters(self) -> list[Weight]:
        """The loaded model's parameters: a tied head gets its own weight from
        `untie_lm_head` when it is a target, or when the model is sharded."""
        return [*self.shape.weights, *([self.shape.tied_head] if self.untied else [])]

    def resident(self) -> int:
        """The loaded model: this process's rows of every parameter in the model's dtype."""
        return self.b * self.here(self.parameters)

    def basis(self) -> PhasePlan:
        """Phase 1 (`basis.build_bases`): moments accumulate over forward passes, then each
        is decomposed; decomposed bases replace their moments, so the two never add up."""
        moments, first = self.second_moments(), self.first_use("basis")
        statistics = (moments, *self.inference(self.hp.basis_batch_size), self.units(), first)
        decomposition = (moments, self.eigh(), first)
        return self._phase(
            "basis", Moment("statistics", statistics), Moment("decomposition", decomposition)
        )

    def importance(self) -> PhasePlan:
        """Phase 2 (`importance.importance_scores`, then `masks_from_importance` on process
        0): whole bases and whole scores on every process, a training forward and backward
        of one importance batch at a time."""
        held = (self.bases_whole(), self.scores(), self.first_use("importance"))
        tokens = self.hp.importance_batch_size * self.hp.max_length
        scoring = (
            *held,
            self.activations("activations", tokens, recompute=False),
            _larger(self.loss(tokens), self.scoring_rotation(tokens)),
            self.units(),
        )
        if self.hp.mask_strategy == "random":  # random scores: no pass over the data
            scoring = held
        masks = Moment("masks", (*held, *self.masking()))
        return self._phase("importance", Moment("scoring", scoring), masks)

    def finetune(self) -> PhasePlan:
        """Phase 3 (`finetune.train`): the trained state for the whole phase, with the
        weight gradients and activations of a step, the optimizer step, the checkpoint save
        and the export of the model as its moments."""
        state = (*self.state(), self.first_use("finetune"))
        tokens, responses = self.micro_tokens()
        activations = self.activations("activations", tokens, self.recompute)
        loss = self.loss(responses, chunked=self.recompute)  # `finetune.train(chunked_loss=)`
        transient = _larger(loss, self.training_rotation(tokens, responses))
        grads = self.gradients()
        if self.hp.grad_accum_steps > 1:  # a later micro-batch runs with every gradient alive
            backward = (*state, grads, activations, transient, self.units(gradients=True))
        else:  # gradients appear as the activations they come from are freed
            forward_part = activations.bytes + transient.bytes
            pair = Term("gradients or activations", max(grads.bytes, forward_part))
            backward = (*state, pair, self.units(gradients=True))
        moments = [
            Moment("building slots", self.loading()),
            Moment("backward", backward),
            Moment("optimizer step", (*state, *self.stepping(grads))),
            Moment("checkpoint", (*state, self.checkpoint_copy())),
            Moment("export", (*[t for t in state if t.name != "adam moments"], self.export())),
        ]
        return self._phase("finetune", *moments)

    def first_use(self, phase: str) -> Term:
        """`FIRST_FORWARD_BYTES` in the phase that runs the process's first forward pass (none
        when the evaluation before training runs it), `FIRST_BACKWARD_BYTES` in the one that
        runs its first backward pass; kept to the end."""
        scored = self.warp and self.hp.mask_strategy == "importance"
        first_forward = None if self.evaluates else ("basis" if self.warp else "finetune")
        first_backward = "importance" if scored else "finetune"
        forward = FIRST_FORWARD_BYTES if phase == first_forward else 0
        return Term("first use", forward + (FIRST_BACKWARD_BYTES if phase == first_backward else 0))

    def _phase(self, name: str, *moments: Moment) -> PhasePlan:
        nonzero = tuple(Moment(m.name, tuple(t for t in m.terms if t.bytes)) for m in moments)
        return PhasePlan(name, self.resident(), nonzero)

    # -- Phase 1 terms -------------------------------------------------------------------

    def second_moments(self) -> Term:
        """One fp32 `n x n` sum per distinct input (`basis.second_moments`), all made before
        the first batch; every process holds all of them until they are reduced."""
        return Term("second moments", FP32 * sum(n * n for n in self.shape.bases.values()))

    def inference(self, batch_size: int) -> tuple[Term, Term]:
        """A no-grad forward of one Phase 1 batch (whole batches per process) and the hook's
        copy of a group's input in fp32 (`x[mask].float()`, at most tokens x widest input).

        Without autograd nothing is saved: a layer holds its input and residual, the MLP's
        gate, up and product and the norms' fp32 copies; the model's own forward then forms
        the logits of every position in the model's dtype, after the layers."""
        tokens = batch_size * self.hp.max_length
        d, m, b = self.shape.hidden, self.shape.intermediate, self.b
        layer = b * (2 * d + 3 * m) + 2 * FP32 * d
        logits = b * (self.shape.vocab + d)
        widest = max(self.shape.bases.values())
        return (
            Term("forward", tokens * max(layer, logits)),
            Term("input in fp32", tokens * (b + FP32) * widest),
        )

    def eigh(self) -> Term:
        """The decomposition of the largest moment (`basis.eigenbasis`)."""
        n = max(self.shape.bases.values())
        return Term("eigh workspace", EIGH_BYTES_PER_ENTRY * n * n)

    # -- Phase 2 terms -------------------------------------------------------------------

    def bases_whole(self) -> Term:
        """Every basis whole, fp32, with its eigenvalues (`export.load_bases`): each process
        rotates every target's gradient."""
        return Term("bases", FP32 * sum(n * n + n for n in self.shape.bases.values()))

    def scores(self) -> Term:
        """`I` in fp32, every target's whole shape on every process: each scores its own
        batches into the whole weights' scores, summed into process 0 at the end."""
        return Term("scores", FP32 * sum(t.numel for t in self.shape.targets))

    def scoring_rotation(self, tokens: int) -> Term:
        """The rotation of one target's gradient in a Phase 2 backward (`importance` sinks,
        the largest target), formed the cheaper way (`rotation.from_activations`)."""
        setting = self.hp.gradient_rotation
        return Term(
            "gradient rotation",
            max(
                self._rotation(t, tokens, from_activations(setting, tokens, t.rows))
                for t in self.shape.targets
            ),
        )

    def masking(self) -> tuple[Term, ...]:
        """Masks from the scores on process 0 (`masks_from_importance`): every mask as bools,
        and `torch.topk`'s values (fp32) and indices (int64) of the weight being ranked, or of
        all of them with a global threshold (after an fp32 concatenation of every score)."""
        numels = [t.numel for t in self.shape.targets]
        ranked = sum(numels) if self.hp.mask_scope == "global" else max(numels)
        concatenated = FP32 * sum(numels) if self.hp.mask_scope == "global" else 0
        return (
            Term("masks", sum(numels)),
            Term("top-k", 12 * math.ceil(self.hp.keep_ratio * ranked) + concatenated),
        )

    # -- Phase 3 terms -------------------------------------------------------------------

    def state(self) -> tuple[Term, ...]:
        """What Phase 3 holds from its start to its end: the trained state and its moments,
        WaRP's W0, packed masks and bases. (The state is built first; the moments appear at
        each slot's first update, so from the second step on they are all there.)"""
        entries = self.state_entries
        offloaded_state = not self.on_device("optimizer_state")
        master_is_param = self.b == FP32 and not offloaded_state
        plain_master = 0 if master_is_param else FP32 * self.here(self.others)
        if self.warp:
            trained = FP32 * (entries - self.here(self.others)) + plain_master
        else:
            trained = 0 if master_is_param else FP32 * entries
        return (
            Term("trained state", 0 if offloaded_state else trained),
            Term("adam moments", 0 if offloaded_state else 2 * self.s * entries),
            self.base_weights(),
            self.mask_bits(),
            *self.bases(),
        )

    def base_weights(self) -> Term:
        """WaRP's W0 (`RotatedSlot.base`): this process's rows of every target in the model's
        dtype, nothing on the GPU with `offload: base_weights`."""
        held = self.warp and self.on_device("base_weights")
        return Term("base weights", self.b * self.targets_here if held else 0)

    def mask_bits(self) -> Term:
        """The masks, this process's rows, bit-packed per row (`bits.pack`: ceil(in / 8) bytes
        a row)."""
        if not self.warp or not self.hp.keep_ratio:
            return Term("mask bits", 0)
        rows = [(math.ceil(t.rows / self.n), math.ceil(t.columns / 8)) for t in self.shape.targets]
        return Term("mask bits", sum(r * c for r, c in rows))

    def bases(self) -> tuple[Term, ...]:
        """In one process every basis whole (fp32); in N, each process holds `ceil(n / N)`
        rows of every basis, and one gathered whole at a time (`World.full`: the padded
        shard it sends and the gathered copy; kept until the next basis is gathered)."""
        if not self.warp:
            return ()
        sizes = self.shape.bases.values()
        if self.n == 1:
            return (Term("bases", FP32 * sum(n * n for n in sizes)),)
        widest = max(sizes)
        rows = FP32 * sum(math.ceil(n / self.n) * n for n in sizes)
        gathered = FP32 * (widest * widest + math.ceil(widest / self.n) * widest)
        return Term("basis rows", rows), Term("gathered basis", gathered)

    def loading(self) -> tuple[Term, ...]:
        """While the slots are built (`Pipeline.slots`), before any moment exists: every bool
        mask of this process's rows is loaded at once and freed as its slot packs it."""
        held = [t for t in self.state() if t.name != "adam moments"]
        masks = self.targets_here if self.warp and self.hp.keep_ratio else 0
        return (*held, Term("bool masks", masks))

    def gradients(self) -> Term:
        """The weight gradients of every trained parameter in the model's dtype, this
        process's rows (FSDP2 reduce-scatters them), accumulated over a step's micro-batches
        and freed as each slot steps."""
        return Term("weight gradients", self.b * (self.targets_here + self.here(self.others)))

    def stepping(self, gradients: Term) -> tuple[Term, ...]:
        """The optimizer step (`finetune.step_slots`). Holding rotated gradients
        (`keep_rotated_gradients`), the clip-norm pass turns every weight gradient into the
        fp32 gradient of the trained entries, dropping each weight gradient once its slot is
        done: at the end of the pass all are held, with the last weight gradient. Otherwise the
        weight gradients stay until each slot steps. Either way one block is in flight."""
        block = Term("block in flight", STEP_BYTES_PER_COEFFICIENT * self.largest_block())
        if not self.keep:
            return gradients, block
        largest = max(t.here(self.n) for t in (*self.shape.targets, *self.others))
        return (
            Term("held rotated gradients", FP32 * self.state_entries),
            Term("last weight gradient", self.b * largest),
            block,
        )

    def largest_block(self) -> int:
        """Coefficients of the largest block a slot steps: whole rows, at most
        `BLOCK_ELEMENTS` (`slots.row_blocks`)."""
        blocks = [
            min(math.ceil(w.rows / self.n), max(1, BLOCK_ELEMENTS // w.columns)) * w.columns
            for w in (*self.shape.targets, *self.others)
        ]
        return max(blocks)

    def training_rotation(self, tokens: int, responses: int) -> Term:
        """The largest transient of a target's backward in Phase 3: its gradient formed from
        the activations (`rotation`) in fp32 when that costs less for the step's tokens, else
        autograd's weight gradient in the model's dtype (whole: FSDP2 reduce-scatters it)."""
        hp = self.hp
        sequences = hp.batch_size * hp.grad_accum_steps
        rotations = 1 if self.keep or hp.max_grad_norm is None else 2
        largest = 0
        for t in self.shape.targets:
            step = sequences * (hp.max_length - 1 if t.head else hp.max_length)
            rotated = self.warp and from_activations(hp.gradient_rotation, step, t.rows, rotations)
            seen = responses if t.head else tokens
            if t.head and self.recompute:  # the head runs a loss chunk at a time
                seen = min(seen, HEAD_CHUNK_TOKENS)
            size = self._rotation(t, seen, rotated) if rotated else self.b * t.numel
            largest = max(largest, size)
        return Term("gradient rotation", largest)

    def _rotation(self, target: TargetShape, tokens: int, from_x: bool) -> int:
        """Bytes of one rotated gradient `G_W U` being formed for `tokens` tokens: from the
        activations (`rotate_activations`: g, x and x U in fp32, the fp32 product, cast to
        the model's dtype when it becomes the weight's gradient), or from the weight gradient
        (`rotate_weight_gradient`: `x^T g` in the model's dtype, its fp32 copy, the fp32
        product)."""
        out, n = target.rows, target.columns
        if from_x:
            return FP32 * tokens * (out + 2 * n) + (FP32 + self.b) * out * n
        return (self.b + 2 * FP32) * out * n

    def checkpoint_copy(self) -> Term:
        """A checkpoint save (`Checkpoint._dense`): one slot at a time as dense tensors of
        its weight's rows on the weight's device, the fp32 state and both moments."""
        largest = max(t.here(self.n) for t in (*self.shape.targets, *self.others))
        return Term("checkpoint copy", (FP32 + 2 * self.s) * largest)

    def export(self) -> Term:
        """Saving the model (`export.full_state_dict`): in N processes process 0 gathers
        the whole model into host memory (the CPU's own memory on a CPU job), one parameter
        at a time through the device; one process saves its own weights."""
        if self.n == 1:
            return Term("export", 0)
        if self.cuda:
            return Term("export", self.b * max(w.numel for w in self.parameters))
        return Term("export", self.b * sum(w.numel for w in self.parameters))

    # -- activations ---------------------------------------------------------------------

    def loss(self, positions: int, chunked: bool = False) -> Term:
        """The cross-entropy over `positions` positions (`LOSS_BYTES_PER_LOGIT` per
        vocabulary entry; `HEAD_CHUNK_TOKENS` positions at a time when `chunked`) and, when
        the head is a target, the hidden states it saves."""
        head_saves = any(t.head for t in self.shape.targets)
        logits = min(positions, HEAD_CHUNK_TOKENS) if chunked else positions
        saved = positions * head_saves * self.b * self.shape.hidden
        return Term("loss", logits * LOSS_BYTES_PER_LOGIT * self.shape.vocab + saved)

    def activations(self, name: str, tokens: int, recompute: bool) -> Term:
        """What autograd saves in a training forward of `tokens` tokens. Without activation
        checkpointing every layer's saved tensors (`layer_saved`); with it each layer's input
        in the model's dtype, plus one layer's tensors while the backward recomputes it. Plus
        the final norm's fp32 input and the attention mask (one `L x L` per sequence in the
        model's dtype, shared by every layer)."""
        layer = self.layer_saved()
        d, length = self.shape.hidden, self.hp.max_length
        layers = self.shape.layers * self.b * d + layer if recompute else self.shape.layers * layer
        mask = (tokens // length) * length * length * self.b
        return Term(name, tokens * (layers + FP32 * d) + mask)

    def layer_saved(self) -> int:
        """Bytes one decoder layer saves for the backward, per token:
        - two RMSNorms: each its input in fp32 (4 d) and its reciprocal norm (4);
        - the inputs of q/k/v and of gate/up (d each, the model's dtype);
        - attention: queries, keys and values after the rotary embedding (keys and values
          repeated to every head, as transformers' SDPA path does with a padding mask), the
          attention output (o_proj's input) and SDPA's log-sum-exp (fp32 per head);
        - gated MLP: the gate's output (SiLU's input), SiLU's output, up's output and their
          product (down_proj's input), intermediate-wide each."""
        d, m, a, b = self.shape.hidden, self.shape.intermediate, self.shape.attention_width, self.b
        norms = 2 * (FP32 * d + FP32)
        inputs = b * 2 * d
        attention = b * 4 * a + FP32 * self.shape.heads
        mlp = b * 4 * m
        return norms + inputs + attention + mlp

    def units(self, gradients: bool = False) -> Term:
        """FSDP2's gathered parameters in N processes: the decoder's own unit (embeddings,
        final norm) stays whole through the decoder's forward and backward while a layer is
        computed and the next one gathered ahead; in a training backward a layer's whole
        gradients and their reduce-scatter buffer too."""
        if self.n == 1:
            return Term("gathered units", 0)
        layer = self.shape.layer_params
        grads = 2 * layer if gradients else 0
        return Term("gathered units", self.b * (self.shape.decoder_params + 2 * layer + grads))


def _larger(first: Term, second: Term) -> Term:
    """Of two transients that never coexist, the larger."""
    return first if first.bytes >= second.bytes else second


# -- making a job fit -----------------------------------------------------------------------


def usable_bytes(gib: float) -> int:
    """What a plan may use of a GPU of `gib` GiB (`KEPT_FREE` is left)."""
    return int(gib * GIB * (1 - KEPT_FREE))


@dataclass(frozen=True)
class Change:
    """A change to a spec: `fields` (dotted paths) -> values, `label` for people."""

    label: str
    fields: dict[str, Any]


ADDED = "hyperparameters.offload"
"""The one field whose changes add up: each offload option offloads one more kind of state,
so options can be taken and dropped one at a time. Every other change replaces a value."""


def apply(spec: JobSpec, changes: Sequence[Change]) -> JobSpec:
    """`spec` with every change applied (`ADDED` entries added), validated again."""
    data = spec.model_dump(mode="json")
    for change in changes:
        for path, value in change.fields.items():
            *parents, leaf = path.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[leaf] = sorted({*node[leaf], *value}) if path == ADDED else value
    return JobSpec.model_validate(data)


def _options(spec: JobSpec, processes: Sequence[int]) -> list[Change]:
    """The ways to need less memory, cheapest first, that would change `spec`: recomputing
    activations, forming rotated gradients twice, bf16 moments, offloading W0 then the
    optimizer state, more processes (`processes`, each a candidate count), then halving the
    micro-batch (with twice the accumulation, so a step sees the same examples)."""
    hp = spec.hyperparameters
    found = []
    if hp.gradient_checkpointing is not True:
        found.append(
            Change("gradient_checkpointing true", {"hyperparameters.gradient_checkpointing": True})
        )
    if hp.keep_rotated_gradients is not False and hp.max_grad_norm is not None:
        found.append(
            Change(
                "keep_rotated_gradients false", {"hyperparameters.keep_rotated_gradients": False}
            )
        )
    if hp.optimizer_state_dtype != "bfloat16":
        found.append(
            Change(
                "optimizer_state_dtype bfloat16",
                {"hyperparameters.optimizer_state_dtype": "bfloat16"},
            )
        )
    for what in ("base_weights", "optimizer_state"):
        if what not in hp.offload and (what != "base_weights" or spec.method == "warp"):
            found.append(Change(f"offload {what}", {"hyperparameters.offload": [what]}))
    found += [
        Change(f"{n} processes", {"resources.gpus": n})
        for n in processes
        if n > spec.resources.gpus
    ]
    batch, accumulation = hp.batch_size, hp.grad_accum_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        fields = {
            "hyperparameters.batch_size": batch,
            "hyperparameters.grad_accum_steps": accumulation,
        }
        found.append(Change(f"batch_size {batch} (grad_accum_steps {accumulation})", fields))
    return found


def ways_to_fit(
    spec: JobSpec,
    shape: ModelShape,
    capacity: Callable[[int], int | None],
    processes: Sequence[int] = (),
    device: str = "cuda",
) -> tuple[list[Change], Plan] | None:
    """The fewest options, cheapest first, with which `spec` fits: `capacity(n)` is the
    bytes a process may use when the job runs in n processes (None: no such machine).

    Options are added one by one in `_options` order until the plan fits; then any option
    the fit does not need is dropped again. None if nothing fits."""

    def fits(changes: Sequence[Change]) -> Plan | None:
        changed = apply(spec, changes)
        limit = capacity(changed.resources.gpus)
        result = plan(changed, shape, device=device)
        return result if limit is not None and result.peak <= limit else None

    chosen: list[Change] = []
    for option in _options(spec, processes):
        chosen = [c for c in chosen if not _replaces(option, c)] + [option]
        if fits(chosen):
            break
    else:
        return None
    for option in list(chosen[:-1]):
        rest = [c for c in chosen if c is not option]
        if fits(rest):
            chosen = rest
    return chosen, fits(chosen)


def lowest(
    spec: JobSpec, shape: ModelShape, processes: Sequence[int], device: str = "cuda"
) -> Plan:
    """The plan with every option applied (the most processes, the smallest micro-batch): the
    least any of them reaches, for a job that nothing makes fit."""
    return plan(apply(spec, _options(spec, processes)), shape, device=device)


def _replaces(option: Change, earlier: Change) -> bool:
    """Whether `option` sets a field `earlier` set (a count of processes, a batch size);
    offloads add up instead."""
    return bool((set(option.fields) & set(earlier.fields)) - {ADDED})
