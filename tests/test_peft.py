"""A real PEFT LoRA model (tiny GPT-2 built from a config: no download): only the adapter is recorded,
the synthesized adapter matches one tracked directly, and it loads back into the PEFT model."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from posthoc_cli import Recorder, plan, scan, synthesize  # noqa: E402

STEPS, EVERY = 400, 20


def lora_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2 with 2 layers of width 32 and LoRA (rank 4) on the attention projections; frozen base."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    return peft.get_peft_model(base, lora)


def adapter_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training run seen by two Recorders: snapshots of 0.05/0.10, and 0.15 tracked directly (the oracle)."""
    root = tmp_path_factory.mktemp("peft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a thread team only contends for the cores (50x slower under load)
    try:
        return _train_and_record(root)
    finally:
        torch.set_num_threads(threads)


def _train_and_record(root: Path) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    model = lora_gpt2()
    # B's init is zero, so the adapter starts as a no-op; give it a start so every tensor moves.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    recorded = Recorder(model, root / "ckpts", sigma_rels=(0.05, 0.10), snapshot_every=EVERY)
    direct = Recorder(model, root / "direct", sigma_rels=(0.15, 0.08), snapshot_every=EVERY)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(STEPS):
        tokens = torch.randint(0, 64, (4, 16), generator=generator)
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorded.update()
        direct.update()
    recorded.close()
    direct.close()
    return root, model, direct.ema_state_dict(0.15, trainable_only=True)


def test_only_the_adapter_is_recorded_under_the_models_names(runs):
    root, model, _ = runs
    catalogue = scan(root / "ckpts")
    names = adapter_names(model)
    assert len(names) == 4 and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    for snap in catalogue.snapshots:
        assert set(snap.tensors) == names
    (frozen,) = catalogue.frozen
    assert set(frozen.tensors) == set(model.state_dict()) - names


def test_synthesized_adapter_matches_a_directly_tracked_one_and_loads_back(runs, tmp_path):
    root, model, oracle = runs
    p = plan(root / "ckpts", [0.15])
    assert float(p.fit.profile_error[0]) < 0.01
    (path,) = synthesize(root / "ckpts", 0.15, out=tmp_path / "adapter.safetensors", trainable_only=True)
    adapter = safetensors.torch.load_file(path)
    assert adapter.keys() == oracle.keys() == adapter_names(model)
    num = sum(float((adapter[n].double() - oracle[n].double()).pow(2).sum()) for n in oracle)
    den = sum(float(oracle[n].double().pow(2).sum()) for n in oracle)
    assert (num / den) ** 0.5 < 1e-3

    # 1. load_state_dict(strict=False) into the PEFT model: only the frozen base is "missing".
    fresh = lora_gpt2()
    result = fresh.load_state_dict(adapter, strict=False)
    assert not result.unexpected_keys and not (set(result.missing_keys) & adapter.keys())
    assert all(torch.equal(fresh.state_dict()[n], adapter[n]) for n in adapter)

    # 2. PEFT's own loader accepts the names as they are (with the adapter name ".default.").
    other = lora_gpt2()
    loaded = peft.set_peft_model_state_dict(other, adapter)
    assert not loaded.unexpected_keys
    assert all(torch.equal(other.state_dict()[n], adapter[n]) for n in adapter)

    # 3. As a PEFT adapter folder: save_pretrained, then PeftModel.from_pretrained on a fresh base.
    fresh.save_pretrained(tmp_path / "adapter-folder")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(fresh.base_model.model.config)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter-folder")
    assert all(torch.equal(reloaded.state_dict()[n], adapter[n]) for n in adapter)


def test_complete_output_loads_strictly_into_the_peft_model(runs, tmp_path):
    root, model, _ = runs
    (path,) = synthesize(root / "ckpts", 0.15, out=tmp_path / "complete.safetensors")
    state = safetensors.torch.load_file(path)
    assert state.keys() == model.state_dict().keys()
    target = lora_gpt2(seed=3)
    target.load_state_dict(state, strict=True)
    for name, tensor in model.state_dict().items():
        if name not in adapter_names(model):
            assert torch.equal(target.state_dict()[name], tensor), name  # frozen base: bit for bit
    assert Path(path).stat().st_size > sum(t.numel() * t.element_size() for t in state.values())
