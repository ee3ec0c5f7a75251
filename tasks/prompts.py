"""Prompt formats shared by several stages.

The Alpaca template is the training format of the fine-tuned model, and also how the pipeline asks the base
model for a response (evol_instruct), so what the data says and what the model learns line up.
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Where a base model that keeps writing after its answer usually starts the next block.
ALPACA_STOPS = ("\n### ", "\n\n\n", "\nBelow is an instruction")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return ALPACA_NO_INPUT.format(instruction=instruction.strip())
