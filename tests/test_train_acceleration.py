"""train_lora.py's speed paths: packed-attention routing and kernel, micro-batching, batch planning, compiler."""

import functools
import json
import math
from pathlib import Path

import pytest

import train_lora
import utils
from reasonforge import batch_plan, cuda_graphs, graph_wrapper, lora, packed_attention
from reasonforge.process_state import ProcessChanges
from conftest import train


def _packed_attention_inputs(lengths, heads=16, kv_heads=2, dim=128):
    import itertools

    import torch

    torch.manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda", dtype=torch.int32)
    return q, k, v, cu


def _attention_reference(q, k, v, spans, window=None):
    """fp32 causal SDPA over each (start, end) span, concatenated; `window` keeps the last N keys."""
    import torch
    import torch.nn.functional as F

    outs = []
    for start, end in spans:
        qs, ks, vs = (x[start:end].transpose(0, 1).float()[None] for x in (q, k, v))
        pos = torch.arange(end - start, device=q.device)
        keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - (window or end))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_flash_varlen_matches_attention_per_document(window):
    """The kernel train_lora gives Unsloth for packed rows: output and all three gradients against fp32
    attention computed document by document, at Qwen2.5-3B's head layout (16 query, 2 K/V heads),
    causal and with a sliding window as Unsloth spells it ((window - 1, 0))."""
    import torch

    if not packed_attention.flash_varlen_available():
        pytest.skip("torch has no flash kernel for this GPU")
    lengths = [300, 57, 1024, 300, 411, 1]
    q, k, v, cu = _packed_attention_inputs(lengths)
    spelled = (-1, 0) if window is None else (window - 1, 0)
    out = packed_attention.flash_varlen_attention()(q, k, v, cu, cu, max(lengths), max(lengths), window_size=spelled,
                                              enable_gqa=True)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    ref = _attention_reference(q, k, v, spans, window)
    want = [ref, *torch.autograd.grad(ref, (q, k, v), grad.float())]

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    errors = [rel(g, w) for g, w in zip(got, want)]
    assert max(errors) < 2e-2, errors
    # the same row attended as one causal sequence differs far beyond that: the check can tell leaks
    leaked = _attention_reference(q, k, v, [(0, sum(lengths))], window)
    assert rel(out, leaked) > 10 * max(errors)


@pytest.mark.gpu
def test_packed_unsloth_training_runs_one_varlen_call_per_layer(tmp_path, sample_dataset, monkeypatch):
    import os

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    utils.import_unsloth_first()
    from unsloth.utils import attention_dispatch as dispatch

    if dispatch._TORCH_VARLEN_ATTN is not None or dispatch.HAS_XFORMERS or dispatch.HAS_FLASH_ATTENTION:
        pytest.skip("this torch/Unsloth already has a varlen route of its own")
    for name in ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN"):  # put Unsloth back as it was afterwards
        monkeypatch.setattr(dispatch, name, getattr(dispatch, name))
    calls, make_kernel = [], packed_attention.flash_varlen_attention

    def counted():
        kernel = make_kernel()
        return lambda *a, **kw: calls.append(a[3].numel() - 1) or kernel(*a, **kw)

    monkeypatch.setattr(packed_attention, "flash_varlen_attention", counted)
    code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--packing", "--max-seq-length", "512",
                      "--max-steps", "3", "--batch-size", "1")
    assert code == 0
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["packed_attention"].startswith("torch flash varlen")
    layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) >= 3 * layers and max(calls) > 1  # every layer, and rows holding several documents
    history = json.loads((out / "training_metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert dispatch._TORCH_VARLEN_ATTN is None  # the routing was undone when training ended


def test_packed_attention_route_installs_a_kernel_only_where_unsloth_would_split():
    from types import SimpleNamespace

    route = packed_attention.route_packed_attention

    def dispatch(**kw):
        return SimpleNamespace(**{"HAS_FLASH_ATTENTION": False, "HAS_XFORMERS": False, "_TORCH_VARLEN_ATTN": None,
                                  "_LEAN_VARLEN": True, "_SDPA_PACKED_SEGMENTS": True, **kw})

    kernel = SimpleNamespace(reasonforge_flash_varlen=True)
    for ready, expected in ((dict(HAS_FLASH_ATTENTION=True), "flash-attn varlen"),
                            (dict(HAS_XFORMERS=True), "xformers block-diagonal"),
                            (dict(HAS_XFORMERS=True, _NATIVE_BEATS_XFORMERS=True, _TORCH_VARLEN_ATTN=print),
                             "torch varlen_attn"),  # torch >= 2.12: Unsloth prefers torch's varlen to xformers
                            (dict(_TORCH_VARLEN_ATTN=print), "torch varlen_attn")):
        d = dispatch(**ready)
        before = vars(d).copy()
        name, undo = route(d, True, lambda: kernel)
        assert name == expected and d._TORCH_VARLEN_ATTN is not kernel
        undo()
        assert vars(d) == before
    d = dispatch()
    name, undo = route(d, False, lambda: kernel)
    assert "no flash kernel" in name and d._TORCH_VARLEN_ATTN is None
    name, undo = route(d, True, lambda: kernel)
    assert name.startswith("torch flash varlen")
    assert d._TORCH_VARLEN_ATTN is kernel and d._LEAN_VARLEN is False
    again, undo_again = route(d, True, lambda: object())
    assert again.startswith("torch flash varlen") and d._TORCH_VARLEN_ATTN is kernel  # installed once
    undo_again()
    assert d._TORCH_VARLEN_ATTN is kernel  # the second call wrote nothing, so it undoes nothing
    undo()  # Unsloth's own values back: the routing does not outlive the run
    assert d._TORCH_VARLEN_ATTN is None and d._LEAN_VARLEN is True
    bare = SimpleNamespace(HAS_FLASH_ATTENTION=False, HAS_XFORMERS=False, _TORCH_VARLEN_ATTN=None,
                           _SDPA_PACKED_SEGMENTS=True)  # an Unsloth without the lean path
    _, undo = route(bare, True, lambda: kernel)
    undo()
    assert vars(bare) == {"HAS_FLASH_ATTENTION": False, "HAS_XFORMERS": False, "_TORCH_VARLEN_ATTN": None,
                          "_SDPA_PACKED_SEGMENTS": True}
    old = SimpleNamespace(HAS_FLASH_ATTENTION=False, HAS_XFORMERS=False)  # an Unsloth without the hook
    assert "no varlen hook" in route(old, True, lambda: kernel)[0]
    dense = dispatch(_SDPA_PACKED_SEGMENTS=False)  # Unsloth would not call a varlen kernel at all
    assert "dense block-diagonal mask" in route(dense, True, lambda: kernel)[0]
    assert dense._TORCH_VARLEN_ATTN is None


def test_packed_attention_route_respects_unsloth_switch(monkeypatch):
    from types import SimpleNamespace

    d = SimpleNamespace(HAS_FLASH_ATTENTION=False, HAS_XFORMERS=False, _TORCH_VARLEN_ATTN=None,
                        _SDPA_PACKED_SEGMENTS=True)
    monkeypatch.setenv("UNSLOTH_TORCH_VARLEN", "0")
    assert "UNSLOTH_TORCH_VARLEN=0" in packed_attention.route_packed_attention(d, True, object)[0]
    assert d._TORCH_VARLEN_ATTN is None


def test_what_setup_changes_outside_the_run_is_undone_however_it_ends(tmp_path, tiny_model, repeated_dataset,
                                                                     monkeypatch):
    """The packed-attention routing writes Unsloth's module state; it is put back when the training
    loop ends (before the outputs are written), and at once when setup fails after it."""
    undone = []
    real = packed_attention.configure_packed_attention

    def recorded(packing, backend, model):
        route, undo = real(packing, backend, model)
        return route, lambda: (undo(), undone.append((tmp_path / "ok" / "final_model").exists()))

    monkeypatch.setattr(packed_attention, "configure_packed_attention", recorded)
    code, _ = train(tmp_path, tiny_model, repeated_dataset, "--max-steps", "2", out="ok")
    assert code == 0 and undone == [False] and (tmp_path / "ok" / "final_model").is_dir()
    code, _ = train(tmp_path, tiny_model, repeated_dataset, "--max-steps", "2", "--max-seq-length", "16", out="bad")
    assert code == 2 and len(undone) == 2


@pytest.mark.slow
def test_micro_batching_does_not_change_the_loss_curve(tmp_path, tiny_model, sample_dataset):
    """What --auto-batch changes (micro-batch x accumulation at the same product) leaves the
    per-step losses as they were: the loss is a token-level mean over the whole effective batch."""
    curves = []
    for micro, accum in ((2, 4), (8, 1)):
        out = tmp_path / f"mb{micro}"
        code = train_lora.main(["--model-name", str(tiny_model), "--dataset-path", str(sample_dataset), "--output-dir",
                                str(out), "--max-steps", "5", "--save-steps", "5", "--batch-size", str(micro),
                                "--gradient-accumulation-steps", str(accum), "--learning-rate", "5e-3", "--seed", "2"])
        assert code == 0
        history = json.loads((out / "training_metrics.json").read_text())["history"]
        curves.append([h["loss"] for h in history if "loss" in h])
    assert len(curves[0]) == 5
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_auto_batch_plan_keeps_effective_batch_and_budget():
    from transformers import Qwen2Config

    shape = Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2)
    roomy = batch_plan.plan_auto_batch(shape, 2048, 8, budget_gib=79, base_gib=2.5)
    small = batch_plan.plan_auto_batch(shape, 2048, 8, budget_gib=24, base_gib=2.5)
    tiny = batch_plan.plan_auto_batch(shape, 2048, 8, budget_gib=6, base_gib=2.5)
    assert (roomy["batch_size"], roomy["gradient_checkpointing"]) == (8, "off")
    # At 24 GB only micro-batch 2 fits without checkpointing; one checkpointed pass of 8 is cheaper.
    assert (small["batch_size"], small["gradient_checkpointing"]) == (8, "unsloth")
    assert small["predicted_peak_gib"] <= 0.85 * 24
    assert tiny["gradient_checkpointing"] == "unsloth" and tiny["predicted_peak_gib"] <= 0.85 * 6
    for plan in (roomy, small, tiny):
        assert plan["batch_size"] * plan["gradient_accumulation_steps"] == 8 and plan["fits"]


def _shape(layers, hidden, inter):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=2)


def test_kept_layers_fill_the_budget_and_never_pass_it(monkeypatch):
    monkeypatch.delenv("UNSLOTH_GC_KEEP_LAYERS", raising=False)
    keep = functools.partial(batch_plan.plan_kept_layers, "auto", backend="unsloth", method="sft", micro=2,
                             seq_len=2048)
    qwen3b, qwen7b = _shape(36, 2048, 11008), _shape(28, 3584, 18944)
    h100 = keep(model_config=qwen3b, budget_gib=79.2, used_gib=2.2, graph_shapes=8)
    a10g_3b = keep(model_config=qwen3b, budget_gib=22.0, used_gib=2.2)
    a10g_7b = keep(model_config=qwen7b, budget_gib=22.0, used_gib=5.5)
    tight = keep(model_config=qwen7b, budget_gib=8.0, used_gib=5.5)
    assert (h100.kept, a10g_3b.kept, a10g_7b.kept, tight.kept) == (36, 36, 24, 0)
    for plan in (h100, a10g_3b, a10g_7b):
        assert plan.predicted_peak_gib <= 0.85 * (79.2 if plan is h100 else 22.0)
    # The 7B plan fills the budget: one more layer (its share is the step between two plans) would pass it.
    fewer = keep(model_config=qwen7b, budget_gib=22.0, used_gib=5.5 + 0.49)
    per_layer = a10g_7b.predicted_peak_gib - fewer.predicted_peak_gib + 0.49
    assert fewer.kept == 23 and 0.4 < per_layer < 0.6
    assert a10g_7b.predicted_peak_gib + per_layer > 0.85 * 22.0
    # A larger batch, or a graph pool, the larger the more shapes it records, leaves room for fewer.
    pooled = [keep(model_config=qwen7b, budget_gib=22.0, used_gib=5.5, graph_shapes=n).kept for n in (1, 8)]
    assert a10g_7b.kept > pooled[0] > pooled[1]
    assert batch_plan.plan_kept_layers("auto", backend="unsloth", method="sft", micro=4, seq_len=2048,
                                         model_config=qwen7b, budget_gib=22.0, used_gib=5.5).kept < a10g_7b.kept
    assert "14 of 28 layers" in batch_plan.KeepPlan(14, 28, "x", 20.0).describe()
    assert "every layer keeps its activations, none recomputed" in h100.describe()


def test_kept_layers_only_where_asked_and_measured(monkeypatch):
    monkeypatch.delenv("UNSLOTH_GC_KEEP_LAYERS", raising=False)
    keep = functools.partial(batch_plan.plan_kept_layers, micro=2, seq_len=2048, model_config=_shape(36, 2048, 11008),
                             budget_gib=79.0, used_gib=2.2)
    assert keep("unsloth", backend="unsloth", method="sft").kept == 0
    assert keep("on", backend="unsloth", method="sft").kept == 0
    assert keep("auto", backend="hf", method="sft").kept == 0
    assert keep("auto", backend="unsloth", method="grpo").kept == 0
    off = keep("off", backend="unsloth", method="sft")
    assert off.kept == 36 and "every layer keeps" in off.describe()
    assert "every layer recomputed" in keep("unsloth", backend="unsloth", method="sft").describe()
    no_gpu = batch_plan.plan_kept_layers("auto", backend="unsloth", method="sft", micro=2, seq_len=2048,
                                           model_config=_shape(36, 2048, 11008), budget_gib=None, used_gib=0.0)
    assert no_gpu.kept == 0
    # Off Unsloth, the Trainer's switch: on the CPU no checkpointing unless asked for plainly.
    for checkpointing in ("auto", "unsloth", "off"):
        cpu = keep(checkpointing, backend="hf", method="sft", budget_gib=None)
        assert cpu.kept == 36 and "none recomputed" in cpu.describe(), cpu
    assert keep("on", backend="hf", method="sft", budget_gib=None).kept == 0
    assert "plain checkpointing of every layer" in keep("unsloth", backend="hf", method="sft").describe()
    picked = keep("unsloth", backend="unsloth", method="sft", chosen_by="--auto-batch chose checkpointing")
    assert "--auto-batch chose checkpointing unsloth" in picked.describe()
    monkeypatch.setenv("UNSLOTH_GC_KEEP_LAYERS", "4")
    # 0 lets Unsloth apply the user's value, which it does under any checkpointing setting.
    for checkpointing, method in (("auto", "sft"), ("unsloth", "sft"), ("auto", "grpo")):
        mine = keep(checkpointing, backend="unsloth", method=method)
        assert mine.kept == 0 and "UNSLOTH_GC_KEEP_LAYERS=4 says (set by you)" in mine.describe()


def test_kept_layers_reach_unsloths_get_peft_model(tmp_path, tiny_model, monkeypatch):
    """attach_lora hands the plan to Unsloth's checkpoint_skip_layers, and none under --gradient-checkpointing off."""
    import sys
    import types

    from reasonforge import training

    seen = []
    fake = types.SimpleNamespace(FastLanguageModel=types.SimpleNamespace(
        get_peft_model=lambda model, **kw: seen.append(kw) or model))
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    config = types.SimpleNamespace(targets=["q_proj"], lora_r=8, lora_alpha=8, lora_dropout=0.0, seed=0,
                                   max_seq_length=256)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for checkpointing, keep in (("auto", 3), ("unsloth", 0), ("off", 2)):
        lora.attach_lora(model, config, backend="unsloth", load_in_4bit=True, checkpointing=checkpointing,
                             keep_layers=keep)
    assert [(kw["use_gradient_checkpointing"], kw["checkpoint_skip_layers"]) for kw in seen] == [
        ("unsloth", 3), ("unsloth", 0), (False, 0)]


@pytest.fixture
def inductor():
    """Inductor's config with cpp_wrapper off, put back by assignment afterwards: monkeypatch's undo
    deletes the setting from torch's config module instead of restoring it."""
    import torch._inductor.config as config

    before = config.cpp_wrapper
    config.cpp_wrapper = False
    yield config
    config.cpp_wrapper = before


def configure(*args, **kwargs) -> str:
    """configure_compiler with a recorder of its own (the inductor fixture puts the setting back)."""
    return graph_wrapper.configure_compiler(*args, changes=ProcessChanges(), **kwargs)


def test_configure_compiler_takes_the_cpp_wrapper_only_where_it_can_and_pays(monkeypatch, inductor):
    long_run = graph_wrapper.CPP_WRAPPER_MIN_STEPS
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert configure("hf", "auto", long_run) == "no compiled graphs on this backend"
    assert inductor.cpp_wrapper is False

    monkeypatch.setattr(graph_wrapper.shutil, "which", lambda name: None)
    assert "no C++ compiler found" in configure("unsloth", "auto", long_run)
    assert inductor.cpp_wrapper is False

    monkeypatch.setattr(graph_wrapper.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang++" else None)
    note = configure("unsloth", "auto", long_run)
    assert note.startswith(f"C++ wrapper ({long_run} planned steps repay its build; clang++")
    assert inductor.cpp_wrapper is True

    # A short run (a quick experiment, a resume near the end) is not worth the build.
    note = configure("unsloth", "auto", long_run - 1)
    assert note.startswith(f"Python wrapper ({long_run - 1} planned steps, fewer than the {long_run}")
    assert inductor.cpp_wrapper is False
    assert configure("unsloth", "cpp", 5).startswith("C++ wrapper (--graph-wrapper cpp")
    assert configure("unsloth", "python", 10_000) == "Python wrapper (--graph-wrapper python)"
    assert inductor.cpp_wrapper is False

    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "1")  # the user's choice wins
    assert configure("unsloth", "auto", 1) == "TORCHINDUCTOR_CPP_WRAPPER=1 as set"
    assert inductor.cpp_wrapper is False


def test_configure_compiler_keeps_the_python_wrapper_under_cuda_graphs(monkeypatch, inductor):
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    monkeypatch.setattr(graph_wrapper.shutil, "which", lambda name: f"/usr/bin/{name}")
    note = configure("unsloth", "auto", 10_000, graphs=True)
    assert note.startswith("Python wrapper (CUDA graphs replay the kernels") and inductor.cpp_wrapper is False
    assert configure("unsloth", "cpp", 5, graphs=True).startswith("C++ wrapper (--graph-wrapper cpp")
    assert inductor.cpp_wrapper is True


def test_length_buckets_keep_padded_lengths_under_unsloths_shape_cap():
    import random

    rng = random.Random(0)
    spreads = {"one": [2048], "narrow": [rng.randint(1880, 2048) for _ in range(200)],
               "wide": [rng.randint(30, 2048) for _ in range(500)], "long": [rng.randint(1, 32768) for _ in range(500)]}
    caps = {"one": 2048, "narrow": 2048, "wide": 2048, "long": 32768}  # --max-seq-length
    for name, lengths in spreads.items():
        cap = caps[name]
        multiple, padded = cuda_graphs.length_bucket(lengths, cap)
        shapes = {-(-n // multiple) * multiple for n in lengths}
        assert multiple % cuda_graphs.BUCKET_ALIGN == 0 and len(shapes) == padded <= cuda_graphs.LENGTH_BUCKETS, name
        assert max(shapes) <= cap, name  # never past --max-seq-length: Unsloth would cut the ids but not the labels
        for finer in range(cuda_graphs.BUCKET_ALIGN, multiple, cuda_graphs.BUCKET_ALIGN):  # the smallest that fits
            over = {-(-n // finer) * finer for n in lengths}
            assert len(over) > cuda_graphs.LENGTH_BUCKETS or max(over) > cap, (name, finer)
    # rows of similar length pad by little; a wide spread needs about longest / 8
    assert cuda_graphs.length_bucket(spreads["narrow"], 2048)[0] <= 32
    assert cuda_graphs.length_bucket(spreads["wide"], 2048)[0] == 256
    assert cuda_graphs.length_bucket([2048], 2048) == (8, 1)
    # rows cut to a --max-seq-length of 2000: 2048 would fit 8 lengths of 256 but overrun the cap
    assert cuda_graphs.length_bucket([*range(30, 2000), 2000], 2000) == (400, 5)
    assert cuda_graphs.length_bucket([2001], 2001) is None  # no multiple of 8 ends at 2001


def test_micro_batch_sizes_include_the_epochs_remainder():
    assert batch_plan.micro_batch_sizes(100, 2) == {2}
    assert batch_plan.micro_batch_sizes(101, 2) == {2, 1}
    assert batch_plan.micro_batch_sizes(101, 4, processes=2) == {4}  # accelerate evens out the ranks' last batch
    assert batch_plan.micro_batch_sizes(3, 8) == {3}


def test_cuda_graph_plan(monkeypatch):
    from types import SimpleNamespace

    import torch
    monkeypatch.delenv("UNSLOTH_BLOCK_CUDAGRAPHS", raising=False)
    plan = functools.partial(cuda_graphs.plan_cuda_graphs, lengths=range(1, 2049), max_length=2048, batch_sizes={2, 1})
    on = plan("auto", backend="unsloth", method="sft", packing=False)
    assert on.on and on.pad_to_multiple_of == 256 and on.max_shapes == on.shapes == 16  # 8 lengths x 2 batch sizes
    assert "padded to a multiple of 256 tokens" in on.describe()
    assert plan("on", backend="unsloth", method="sft", packing=False).reason == "--cuda-graphs on"
    assert not plan("off", backend="unsloth", method="sft", packing=False).on
    for kw, why in (({"backend": "hf"}, "no compiled blocks"), ({"method": "grpo"}, "grpo"),
                    ({"packing": True}, "packed rows")):
        args = {"backend": "unsloth", "method": "sft", "packing": False, **kw}
        off = plan("auto", **args)
        assert not off.on and off.pad_to_multiple_of is None and why in off.reason
        with pytest.raises(utils.UserError, match="--cuda-graphs on: .*" + why):
            plan("on", **args)
    hopper = plan("auto", backend="unsloth", method="sft", packing=False, capability=(9, 0))
    ampere = plan("auto", backend="unsloth", method="sft", packing=False, capability=(8, 6))  # an A10G
    assert hopper.on and not ampere.on and "compute capability 8.6" in ampere.reason
    assert plan("on", backend="unsloth", method="sft", packing=False, capability=(8, 6)).on
    # Unsloth left the blocks stock (UNSLOTH_BLOCK_COMPILE=0): nothing would record, so the plan says off
    stock = SimpleNamespace(modules=lambda: [torch.nn.Linear(1, 1)])
    assert not cuda_graphs.confirm_cuda_graphs(hopper, stock).on
    compiled = type("Block", (torch.nn.Module,), {"forward": lambda self, x: x})
    compiled.forward._unsloth_block_compiled = True
    assert cuda_graphs.confirm_cuda_graphs(hopper, SimpleNamespace(modules=lambda: [compiled()])) is hopper
    short = plan("on", backend="unsloth", method="sft", packing=False, lengths=[2001], max_length=2001)
    assert not short.on and "--max-seq-length 2001" in short.reason
    monkeypatch.setenv("UNSLOTH_BLOCK_CUDAGRAPHS", "0")  # the user's own setting wins over auto
    assert plan("auto", backend="unsloth", method="sft", packing=False).reason == "UNSLOTH_BLOCK_CUDAGRAPHS=0 as set"


@pytest.mark.slow
def test_length_buckets_leave_the_loss_curve_unchanged(tmp_path, tiny_model, sample_dataset, monkeypatch):
    """The padding CUDA graphs ask for adds only masked tokens: per-step and validation losses stay
    as they were, and every padded batch is a multiple of the bucket."""
    from reasonforge import training

    lengths = []
    collate = __import__("trl").trainer.sft_trainer.DataCollatorForLanguageModeling.torch_call
    monkeypatch.setattr("trl.trainer.sft_trainer.DataCollatorForLanguageModeling.torch_call",
                        lambda self, examples: (out := collate(self, examples), lengths.append(out["input_ids"].shape[1]))[0])
    real = training.plan_cuda_graphs
    curves = {}
    for bucket in (None, 64):
        if bucket:  # a CPU run has no compiled blocks, so ask for the padding alone
            monkeypatch.setattr(training, "plan_cuda_graphs",
                                lambda *a: cuda_graphs.GraphPlan(True, "test", bucket, 16))
            monkeypatch.setattr(cuda_graphs, "confirm_cuda_graphs", lambda plan, model: plan)
        else:
            monkeypatch.setattr(training, "plan_cuda_graphs", real)
        lengths.clear()
        code, out = train(tmp_path, tiny_model, sample_dataset, "--max-steps", "4", "--seed", "2", out=f"b{bucket}")
        assert code == 0
        metrics = json.loads((out / "training_metrics.json").read_text())
        curves[bucket] = ([h["loss"] for h in metrics["history"] if "loss" in h], metrics["best_validation_loss"])
        padded = [n for n in lengths if n % 64]
        assert (padded == []) if bucket else padded, lengths  # the plain run's lengths are not all multiples
        cfg = json.loads((out / "training_config.json").read_text())
        assert cfg["cuda_graphs"]["pad_to_multiple_of"] == bucket
    assert len(curves[None][0]) == 4
    assert curves[64][0] == pytest.approx(curves[None][0], rel=1e-5)
    assert curves[64][1] == pytest.approx(curves[None][1], rel=1e-5)


# The loss comparisons of the gpu tests below run at the default learning rate, not the helper's 5e-3.
# At 5e-3 (run 25, benchmarks/RESULTS.md), 4 steps of the 0.5B shape put the run with CUDA graphs and
# every layer kept 1.6-1.8e-3 relative away, at one step, from both the run without graphs and the run
# with every layer recomputed, which agreed with each other within 2e-4. Adam's first updates are about
# lr x sign(gradient), so at a large rate rounding differences between compiled graphs can flip whole
# updates of near-zero gradients; 30 steps of the 3B shape at 2e-4, graphs with every layer kept
# against every layer recomputed, stayed within 6.2e-5. At 2e-4 both tests passed on an H100 (run 26):
# largest relative differences 5.9e-5 (kept against recomputed) and 5.5e-5 (graphs against none), and
# step 1's gradient norms of kept and recomputed layers within 8.4e-4 of each other.
LOSS_CHECK_LR = "2e-4"


@pytest.mark.gpu
def test_unsloth_cuda_graphs_replay_and_keep_the_losses(tmp_path, sample_dataset, monkeypatch):
    """--cuda-graphs auto records and replays graphs of Unsloth's blocks; off never does; the losses
    of the two runs agree."""
    import os

    import torch

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    if torch.cuda.get_device_capability() < cuda_graphs.GRAPHS_MIN_CAPABILITY:
        pytest.skip("auto records CUDA graphs on compute capability 9.0+ only")
    replays, replay = [], torch.cuda.graphs.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.graphs.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    curves, counts = {}, {}
    for mode in ("off", "auto", "off"):  # off again: a class wrapped with graphs is rewrapped without them
        replays.clear()
        code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--max-seq-length", "512",
                          "--max-steps", "4", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--seed", "2",
                          "--learning-rate", LOSS_CHECK_LR, "--cuda-graphs", mode, out=f"{mode}{len(curves)}")
        assert code == 0
        cfg = json.loads((out / "training_config.json").read_text())
        assert cfg["cuda_graphs"]["on"] == (mode == "auto") and cfg["compiler"].startswith("Python wrapper")
        history = json.loads((out / "training_metrics.json").read_text())["history"]
        curves[f"{mode}{len(curves)}"] = [h["loss"] for h in history if "loss" in h]
        counts[f"{mode}{len(counts)}"] = len(replays)
    print("per-step losses", curves)
    assert counts["off0"] == 0 and counts["auto1"] > 0 and counts["off2"] == 0, counts
    assert len(curves["auto1"]) == 4
    assert curves["auto1"] == pytest.approx(curves["off0"], rel=1e-3)
    assert curves["off2"] == pytest.approx(curves["off0"], rel=1e-3)


@pytest.mark.gpu
def test_unsloth_kept_layers_skip_the_recompute_and_keep_the_losses(tmp_path, sample_dataset, monkeypatch):
    """--gradient-checkpointing auto keeps a small model's every layer out of checkpointing on a big
    GPU: each layer then runs one training forward a micro-batch instead of two, and the losses
    match those of every layer recomputed."""
    import os

    import torch

    from reasonforge import training

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    calls, attach = [], lora.attach_lora

    def counted(*a, **kw):
        wrapped = attach(*a, **kw)
        for m in wrapped.modules():
            if type(m).__name__.endswith("DecoderLayer"):
                m.register_forward_pre_hook(lambda mod, args: calls.append(1) if mod.training else None)
        return wrapped

    monkeypatch.setattr(lora, "attach_lora", counted)
    curves, counts, kept, norms = {}, {}, {}, {}
    for mode in ("unsloth", "auto"):
        calls.clear()
        code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--max-seq-length", "512",
                          "--max-steps", "4", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--seed", "2",
                          "--learning-rate", LOSS_CHECK_LR, "--gradient-checkpointing", mode, out=mode)
        assert code == 0
        cfg = json.loads((out / "training_config.json").read_text())
        kept[mode] = (cfg["kept_layers"]["kept"], cfg["kept_layers"]["layers"])
        history = json.loads((out / "training_metrics.json").read_text())["history"]
        curves[mode] = [h["loss"] for h in history if "loss" in h]
        norms[mode] = [h["grad_norm"] for h in history if "grad_norm" in h]
        counts[mode] = len(calls)
    print("per-step losses", curves, "gradient norms", norms, "layer forwards", counts)
    layers = kept["auto"][1]
    assert kept == {"unsloth": (0, layers), "auto": (layers, layers)}, kept
    # 4 steps x 2 micro-batches; the recompute doubles each layer's training forwards.
    assert counts["auto"] >= 8 * layers and counts["unsloth"] >= 2 * 8 * layers - layers, counts
    assert counts["auto"] < 0.6 * counts["unsloth"], counts
    assert len(curves["auto"]) == 4
    assert curves["auto"] == pytest.approx(curves["unsloth"], rel=1e-3)
    # Same weights at step 1: the gradients themselves agree to bf16 rounding.
    assert norms["auto"][0] == pytest.approx(norms["unsloth"][0], rel=1e-2)
    torch.cuda.empty_cache()


def test_planned_steps():
    batch = batch_plan.BatchPlan(batch_size=2, gradient_accumulation_steps=4, gradient_checkpointing="auto")
    assert batch_plan.planned_steps(100, batch, epochs=3) == 3 * 13  # 50 micro-batches -> 13 steps an epoch
    assert batch_plan.planned_steps(100, batch, epochs=3, done=30) == 9
    assert batch_plan.planned_steps(100, batch, epochs=3, max_steps=30) == 30
    assert batch_plan.planned_steps(100, batch, epochs=3, max_steps=30, processes=2) == 30


@pytest.mark.gpu
def test_unsloth_micro_batching_keeps_losses_token_weighted(tmp_path, sample_dataset, capfd):
    """On the Unsloth backend, 2 x 4 and 8 x 1 give the same per-step losses on rows of different
    lengths: each micro-batch loss is divided by the target tokens of the whole effective batch
    (num_items_in_batch), not averaged per micro-batch. The validation loss the Trainer picks the best
    checkpoint on is the one evaluate_model.py reports."""
    import os

    import evaluate_model

    model = os.environ.get("RF_GPU_TEST_MODEL")
    if not model:
        pytest.skip("set RF_GPU_TEST_MODEL to a local Qwen folder")
    curves, runs = [], []
    for micro, accum in ((2, 4), (8, 1)):
        code, out = train(tmp_path, model, sample_dataset, "--backend", "unsloth", "--max-steps", "4", "--save-steps", "4",
                          "--eval-steps", "4", "--batch-size", str(micro), "--gradient-accumulation-steps", str(accum),
                          "--learning-rate", "2e-4", "--seed", "2", out=f"mb{micro}")
        assert code == 0
        history = json.loads((out / "training_metrics.json").read_text())["history"]
        curves.append([h["loss"] for h in history if "loss" in h])
        runs.append(out)
    print("per-step losses 2x4:", curves[0], "8x1:", curves[1])
    assert len(curves[0]) == 4 and curves[0] == pytest.approx(curves[1], rel=1e-3)
    report = tmp_path / "e.json"
    assert evaluate_model.main(["--model-path", str(runs[1] / "final_model"), "--dataset-path", str(sample_dataset),
                                "--backend", "unsloth", "--compute-perplexity", "--batch-size", "8",
                                "--output-file", str(report)]) == 0
    reported = json.loads(report.read_text())["metrics"]["perplexity"]["finetuned"]["avg_loss"]
    trainer = json.loads((runs[1] / "training_metrics.json").read_text())["best_validation_loss"]
    print("validation loss: trainer", trainer, "evaluate_model", reported)
    assert trainer == pytest.approx(reported, rel=2e-3)


def test_configure_compiler_setting_is_put_back_by_the_recorder(monkeypatch, inductor):
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    monkeypatch.setattr(graph_wrapper.shutil, "which", lambda name: f"/usr/bin/{name}")
    with ProcessChanges() as changes:
        graph_wrapper.configure_compiler("unsloth", "cpp", 5, changes=changes)
        assert inductor.cpp_wrapper is True
    assert inductor.cpp_wrapper is False
