"""Load the synthesized adapter (adapter.safetensors, from `synthesize lora-ckpts ... --trainable-only`) three ways."""

import safetensors.torch
from peft import set_peft_model_state_dict

from lora_train import make_lora_model
from posthoc_cli import load_synthesized

lora_model = make_lora_model()  # the same base and LoRA configuration as the recorded run
adapter = safetensors.torch.load_file("adapter.safetensors")
lora_model.load_state_dict(adapter, strict=False)  # plain torch: the frozen base is left as it is
set_peft_model_state_dict(lora_model, adapter)  # or PEFT's own loader, which accepts these names
lora_model.save_pretrained("lora-ema-0.15")  # a PEFT adapter folder: PeftModel.from_pretrained(base, "lora-ema-0.15")

# The same in memory, without a file (trainable_only=False gives the complete state dict):
lora_model.load_state_dict(load_synthesized("lora-ckpts", 0.15, trainable_only=True), strict=False)
print(f"loaded {len(adapter)} adapter tensors, e.g. {sorted(adapter)[0]}")
