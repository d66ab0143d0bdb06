"""Fine-tuning with LoRA (PEFT): only the adapter is averaged; the frozen base is stored once."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from posthoc_cli import Recorder


def make_lora_model():
    torch.manual_seed(0)
    # Your pretrained model comes from from_pretrained(); a tiny GPT-2 keeps this example offline.
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))


if __name__ == "__main__":
    lora_model = make_lora_model()
    opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=3e-3)

    # Made after get_peft_model() froze the base: only the LoRA weights are averaged and written
    # in each snapshot; the frozen base goes once into lora-ckpts/frozen.safetensors.
    with Recorder(lora_model, "lora-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=20) as rec:
        for step in range(rec.t, 400):
            tokens = torch.randint(0, 64, (8, 16))
            loss = lora_model(input_ids=tokens, labels=tokens).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.update()
    print(f"trained {rec.t} steps; last loss {loss.item():.3f}")
