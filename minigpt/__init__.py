"""minigpt: the ChatGPT recipe — pretrain, SFT, reward model, PPO — small enough to read.

Importing the package registers the GPT with Transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained("runs/default/ppo")` works after `import minigpt`.
"""

from minigpt.model import (MiniGPTConfig, MiniGPTForCausalLM, MiniGPTForSequenceClassification,
                           MiniGPTModel)

__all__ = ["MiniGPTConfig", "MiniGPTModel", "MiniGPTForCausalLM", "MiniGPTForSequenceClassification"]
