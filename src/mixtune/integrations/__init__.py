"""Integrations with other training stacks (Hugging Face ``Trainer`` / TRL ``SFTTrainer``).

``from mixtune.integrations import MixtureDataset, MixtureCallback`` needs ``transformers``.
"""

from mixtune.integrations.dataset import MixtureDataset
from mixtune.integrations.hf import MixtureCallback

__all__ = ["MixtureCallback", "MixtureDataset"]
