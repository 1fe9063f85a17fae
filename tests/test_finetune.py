"""Phase 3 invariants (WARP.md): the update stays out of frozen rotated coordinates, zero steps
change nothing, non-targets stay frozen, accumulation and resume are exact; and each memory
option keeps the invariant and the bitwise resume."""

from __future__ import annotations

import typing

import pytest
import torch

from tests.helpers import encoded_batches, make_spec, utility_ref
from warp_core import loss as loss_module
from warp_core import slots as slot_module
from warp_core.data import collate, encode_examples, load_examples, pad_token_id
from warp_core.export import load_bases, load_masks
from warp_core.finetune import Schedule, accumulate_gradients
from warp_core.loss import response_loss_sum, response_tokens
from warp_core.model import find_targets, load_model, set_trainable
from warp_core.optimizer import SlotAdamW
from warp_core.pipeline import Cancelled, Pipeline
from warp_core.rotation import rotate_activations, rotate_weight_gradient, rotated_backward
from warp_core.slots import Block, PlainSlot, RotatedSlot
from warp_core.spec import Hyperparameters


def base_model(model_dir):
    return load_model(str(model_dir), torch.float32, torch.device("cpu"))[0]


def prepared(spec, out):
    """A pipeline whose Phases 1 and 2 are done, ready to build its trainable slots."""
    pipeline = Pipeline(spec, out)
    pipeline.out.mkdir(parents=True, exist_ok=True)
    pipeline.stage("basis", pipeline.build_bases)
    pipeline.stage("importance", pipeline.score_importance)
    return pipeline


def rotated_change(pipeline, model_dir):
    """Per target weight: ((W_final - W0) U, frozen mask)."""
    base = dict(base_model(model_dir).named_parameters())
    bases = load_bases(pipeline.out / "warp", torch.device("cpu"))
    masks = load_masks(pipeline.out / "warp", torch.device("cpu"))
    return {
        t.param_name: (
            (t.weight.detach() - base[t.param_name]).double() @ bases.for_target(t).double(),
            masks[t.param_name],
        )
        for t in find_targets(pipeline.model, pipeline.hp.target_modules)
    }


def test_the_loss_taken_a_head_chunk_at_a_time_is_the_whole_loss(model_dir, tokenizer, monkeypatch):
    """With activation recomputation the head's logits exist one chunk at a time; the loss
    and every gradient are those of the whole (to float rounding: other sums)."""
    batch = encoded_batches(tokenizer, utility_ref(limit=8), batch_size=8)[0]
    results = []
    for chunked in (False, True):
        model = base_model(model_dir)
        monkeypatch.setattr(loss_module, "HEAD_CHUNK_TOKENS", 13)
        value = response_loss_sum(model, batch, chunked)
        value.backward()
        results.append((value, {n: p.grad for n, p in model.named_parameters()}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert response_tokens(batch) > 10 * 13
    torch.testing.assert_close(chunked, whole)
    for name, grad in whole_grads.items():
        assert_near(chunked_grads[name], grad, 1e-5)


def test_the_response_loss_is_the_models_own_loss_summed(model_dir, tokenizer):
    """Applying lm_head to response positions only changes nothing but the cost."""
    model = base_model(model_dir)
    for batch in encoded_batches(tokenizer, utility_ref(limit=8), batch_size=4):
        with torch.no_grad():
            expected = model(**batch).loss * response_tokens(batch)
            torch.testing.assert_close(response_loss_sum(model, batch), expected)


def test_the_slot_optimizer_is_torch_adamw_to_the_bit():
    """Per-block updates with the hyperparameters' betas, decay and schedule equal
    `torch.optim.AdamW` stepping the whole tensor."""
    hp = Hyperparameters(adam_beta1=0.8, adam_beta2=0.95, weight_decay=0.1, warmup_ratio=0.3)
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(7, 5))
    theirs = torch.nn.Parameter(ours.detach().clone())
    reference = torch.optim.AdamW(
        [theirs], lr=hp.learning_rate, betas=(0.8, 0.95), weight_decay=0.1
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        reference, lambda step: SlotAdamW(hp, 10).learning_rate(step) / hp.learning_rate
    )
    slot = PlainSlot("w", ours, torch.device("cpu"))
    blocks = [Block(slice(0, 3), slice(0, 15)), Block(slice(3, 7), slice(15, 35))]
    optimizer = SlotAdamW(hp, total_steps=10)
    for step in range(4):
        grad = torch.randn(7, 5)
        theirs.grad = grad.clone()
        reference.step()
        schedule.step()
        lr = optimizer.learning_rate(step)
        for block in blocks:
            optimizer.update(slot, block, grad[block.rows].reshape(-1), lr)
        optimizer.finish(slot)
    assert torch.equal(ours, theirs)


SCHEDULES = typing.get_args(Hyperparameters.model_fields["lr_scheduler"].annotation)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_the_spec_accepts_runs_from_warmup_to_its_end(name):
    hp = Hyperparameters(lr_scheduler=name, warmup_ratio=0.2, min_lr_rate=0.25)
    rates = [SlotAdamW(hp, total_steps=10).learning_rate(step) for step in range(10)]
    assert rates[2] == pytest.approx(hp.learning_rate)
    if name != "constant":  # the one schedule without warm-up
        assert rates[0] < rates[2]
    ends = {"constant_with_warmup": 1.0, "cosine_with_min_lr": 0.25}
    if name in ends:
        assert rates[-1] >= ends[name] * hp.learning_rate * 0.99
    elif name != "constant":
        assert rates[-1] < 0.3 * hp.learning_rate


def test_zero_steps_reproduce_the_base_logits_exactly(model_dir, tmp_path, tokenizer):
    pipeline = prepared(make_spec(model_dir), tmp_path)
    for slot in pipeline.slots():
        for block in slot.blocks:
            slot.write_back(block)
    ids = tokenizer("How many apples are left?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(pipeline.model(ids).logits, base_model(model_dir)(ids).logits)


def test_frozen_coefficients_get_exactly_zero_gradient(model_dir, tmp_path):
    pipeline = prepared(make_spec(model_dir), tmp_path)
    slots = [s for s in pipeline.slots() if isinstance(s, RotatedSlot)]
    items, _ = encode_examples(
        pipeline.tokenizer, load_examples(pipeline.spec.utility_data), pipeline.hp.max_length
    )
    response_loss_sum(
        pipeline.model, collate(items[:4], pad_token_id(pipeline.tokenizer))
    ).backward()
    masks = load_masks(pipeline.out / "warp", pipeline.device)  # as saved by Phase 2
    bases = load_bases(pipeline.out / "warp", pipeline.device)
    for slot in slots:
        (block,) = slot.blocks
        rotated = slot.param.grad @ bases.U[bases.key_of[slot.name.removesuffix(".weight")]]
        frozen = masks[slot.name]
        assert frozen.any()
        gradient = slot.dense(block, slot.gradient(block))
        assert torch.count_nonzero(gradient[frozen]) == 0, slot.name
        assert torch.equal(gradient[~frozen], rotated[~frozen]), slot.name
        assert slot.master.numel() == (~frozen).sum(), "frozen coefficients have no state"
        assert slot.frozen_bits.numel() == frozen.shape[0] * -(-frozen.shape[1] // 8), "packed"


def test_training_moves_only_unfrozen_rotated_coordinates(model_dir, tmp_path):
    pipeline = Pipeline(make_spec(model_dir), tmp_path)
    pipeline.run()
    for name, (change, frozen) in rotated_change(pipeline, model_dir).items():
        scale = change.abs().max()
        assert scale > 0, name
        assert change[frozen].abs().max() <= 1e-6 * scale, name
        moved = (change[~frozen].abs() > 1e-3 * scale).double().mean()
        assert moved > 0.5, f"{name}: only {moved:.0%} of unfrozen coefficients moved"


def test_plain_fine_tuning_moves_the_frozen_coordinates_too(model_dir, tmp_path):
    """The baseline breaks the invariant, so the invariant test above can fail."""
    warp = Pipeline(make_spec(model_dir), tmp_path / "warp")
    warp.run()
    full = Pipeline(make_spec(model_dir, method="full"), tmp_path / "full")
    full.run()
    full.out.joinpath("warp").symlink_to(warp.out / "warp")
    for name, (change, frozen) in rotated_change(full, model_dir).items():
        assert change[frozen].abs().max() > 1e-3 * change.abs().max(), name


@pytest.mark.parametrize("train_other_params", [False, True])
def test_non_target_parameters_train_only_when_asked(model_dir, tmp_path, train_other_params):
    pipeline = Pipeline(make_spec(model_dir, train_other_params=train_other_params), tmp_path)
    pipeline.run()
    base = dict(base_model(model_dir).named_parameters())
    targets = {t.param_name for t in pipeline.targets}
    others = [(n, p) for n, p in pipeline.model.named_parameters() if n not in targets]
    assert {n for n, _ in others} >= {"model.embed_tokens.weight", "model.norm.weight"}
    for name, param in others:
        assert torch.equal(param, base[name]) != train_other_params, name


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Equal to `tolerance` of the tensor's largest entry: float rounding, not a change."""
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= tolerance * scale, float(
        (actual - expected).abs().max() / scale
    )


def final_weights(pipeline) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipeline.model.named_parameters()}


def test_training_is_deterministic_for_a_seed(model_dir, tmp_path):
    first = Pipeline(make_spec(model_dir), tmp_path / "a")
    first.run()
    second = Pipeline(make_spec(model_dir), tmp_path / "b")
    second.run()
    for name, weight in final_weights(first).items():
        assert torch.equal(weight, final_weights(second)[name]), name


def test_gradient_checkpointing_recomputes_and_reaches_the_same_weights(model_dir, tmp_path):
    calls = {}

    def trained(name: str, **hp) -> dict[str, torch.Tensor]:
        pipeline = Pipeline(make_spec(model_dir, **hp), tmp_path / name)
        mlp = pipeline.model.model.layers[0].mlp
        forward = mlp.forward  # counted by wrapping: the recomputation runs no module hooks

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return forward(*args, **kwargs)

        mlp.forward = counted
        pipeline.run()
        return final_weights(pipeline)

    kept = trained("kept", gradient_checkpointing=False)
    recomputed = trained("recomputed", gradient_checkpointing=True)
    assert calls["recomputed"] > calls["kept"], "the layer ran again in the backward pass"
    for name, weight in kept.items():
        assert torch.equal(recomputed[name], weight), name


def step_gradients(pipeline, batch_size: int, grad_accum_steps: int) -> dict[str, torch.Tensor]:
    """The accumulated target-weight gradients of optimizer step 0 for a given split."""
    hp = pipeline.hp.model_copy(
        update={"batch_size": batch_size, "grad_accum_steps": grad_accum_steps}
    )
    items, _ = encode_examples(
        pipeline.tokenizer, load_examples(pipeline.spec.utility_data), hp.max_length
    )
    pad = pad_token_id(pipeline.tokenizer)
    micro = [
        collate([items[i] for i in ids], pad) for ids in Schedule(len(items), hp).micro_batches(0)
    ]
    pipeline.model.zero_grad(set_to_none=True)
    accumulate_gradients(pipeline.model, micro, None)
    return {t.param_name: t.weight.grad.clone() for t in pipeline.targets}


def test_a_step_does_not_depend_on_its_micro_batch_split(model_dir, tmp_path):
    pipeline = Pipeline(make_spec(model_dir), tmp_path)
    set_trainable(pipeline.model, pipeline.targets, False)
    whole = step_gradients(pipeline, 8, 1)
    for batch_size, accum in [(4, 2), (2, 4), (1, 8)]:
        split = step_gradients(pipeline, batch_size, accum)
        for name, grad in whole.items():
            torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6)


def test_resume_after_interruption_gives_the_uninterrupted_weights(model_dir, tmp_path):
    spec = make_spec(model_dir, max_steps=6, checkpoint_every=2)
    uninterrupted = Pipeline(spec, tmp_path / "whole")
    uninterrupted.run()

    events = []

    def stop_after_step_four() -> bool:
        return any(e.phase == "finetune" and e.data.get("step", 0) >= 4 for e in events)

    interrupted = Pipeline(
        spec, tmp_path / "resumed", on_event=events.append, should_stop=stop_after_step_four
    )
    with pytest.raises(Cancelled):
        interrupted.run()
    assert not (tmp_path / "resumed" / "model").exists()
    resumed_events = []
    resumed = Pipeline(spec, tmp_path / "resumed", on_event=resumed_events.append)
    resumed.run()
    steps = [
        e.data["step"] for e in resumed_events if e.kind == "progress" and e.phase == "finetune"
    ]
    assert steps == [5, 6], "the resumed run restarts from the step-4 checkpoint"
    expected = final_weights(uninterrupted)
    for name, weight in final_weights(resumed).items():
        assert torch.equal(weight, expected[name]), name


def interrupted_and_resumed(spec, out, stop_at: int = 4) -> dict[str, torch.Tensor]:
    """The weights of a job stopped after step `stop_at` and run again to its end."""
    events = []

    def stop() -> bool:
        return any(e.phase == "finetune" and e.data.get("step", 0) >= stop_at for e in events)

    with pytest.raises(Cancelled):
        Pipeline(spec, out, on_event=events.append, should_stop=stop).run()
    resumed = Pipeline(spec, out)
    resumed.run()
    return final_weights(resumed)


OPTIONS = {
    "recomputed rotated gradients": {"keep_rotated_gradients": False},
    "bf16 optimizer state": {"optimizer_state_dtype": "bfloat16"},
    "offloaded state": {"offload": ["base_weights", "optimizer_state"]},
    "gradients rotated from activations": {"gradient_rotation": "activations"},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_each_memory_option_keeps_the_invariant_and_the_exact_resume(model_dir, tmp_path, option):
    spec = make_spec(model_dir, max_steps=6, checkpoint_every=2, **OPTIONS[option])
    whole = Pipeline(spec, tmp_path / "whole")
    whole.run()
    for name, (change, frozen) in rotated_change(whole, model_dir).items():
        assert change[frozen].abs().max() <= 1e-6 * change.abs().max(), name
    resumed = interrupted_and_resumed(spec, tmp_path / "resumed")
    for name, weight in final_weights(whole).items():
        assert torch.equal(resumed[name], weight), name


def test_options_that_only_move_state_give_the_default_weights_to_the_bit(model_dir, tmp_path):
    """Holding or forming again the rotated gradients, and where state lives, change memory
    and time, never the result."""
    default = Pipeline(make_spec(model_dir, max_steps=3), tmp_path / "default")
    default.run()
    for index, hp in enumerate(
        [{"keep_rotated_gradients": False}, {"offload": ["base_weights", "optimizer_state"]}]
    ):
        other = Pipeline(make_spec(model_dir, max_steps=3, **hp), tmp_path / str(index))
        other.run()
        for name, weight in final_weights(default).items():
            assert torch.equal(final_weights(other)[name], weight), (hp, name)


def test_small_blocks_give_the_same_training(model_dir, tmp_path, monkeypatch):
    """A weight stepped a few rows at a time trains as when stepped whole."""
    whole = Pipeline(make_spec(model_dir, max_steps=3), tmp_path / "whole")
    whole.run()
    monkeypatch.setattr(slot_module, "BLOCK_ELEMENTS", 500)
    blocked = Pipeline(make_spec(model_dir, max_steps=3), tmp_path / "blocked")
    blocked.run()
    assert max(len(s.blocks) for s in blocked.slots()) > 10
    for name, weight in final_weights(whole).items():
        assert_near(final_weights(blocked)[name], weight, 1e-4)


def test_both_forms_of_the_rotated_gradient_agree(model_dir, tokenizer):
    """`(G_W) U` and `g^T (x U)` on the same backward pass, for every kind of target."""
    model = base_model(model_dir)
    targets = find_targets(model, ["q_proj", "k_proj", "down_proj", "lm_head"])
    bases = {
        t.name: torch.linalg.qr(torch.randn(t.module.in_features, t.module.in_features))[0]
        for t in targets
    }
    forms = {}

    def both(name):
        def sink(x, g):
            forms[name] = (
                rotate_weight_gradient(x, g, bases[name]),
                rotate_activations(x, g, bases[name]),
            )

        return sink

    batch = encoded_batches(tokenizer, utility_ref(limit=4), batch_size=4)[0]
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    with rotated_backward({t.module: both(t.name) for t in targets}):
        response_loss_sum(model, batch).backward()
    assert set(forms) == {t.name for t in targets}
    for from_weights, from_activations in forms.values():
        assert_near(from_activations, from_weights, 1e-5)


def test_training_through_either_form_reaches_the_same_weights(model_dir, tmp_path):
    """The forms differ by float rounding only: far less than what training moves (Adam
    magnifies rounding where a coordinate's gradient is near zero, so compare with that)."""
    runs = {}
    for form in ("weights", "activations"):
        pipeline = Pipeline(make_spec(model_dir, gradient_rotation=form), tmp_path / form)
        pipeline.run()
        runs[form] = final_weights(pipeline)
    base = dict(base_model(model_dir).named_parameters())
    for name, weight in runs["weights"].items():
        moved = (weight - base[name]).abs().max()
        assert (runs["activations"][name] - weight).abs().max() <= 1e-2 * moved, name
