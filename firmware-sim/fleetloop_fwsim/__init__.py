"""The simulated device under the agent: A/B slots and bootloader, generated signals, device supervisor."""

__version__ = "0.1.0"
