"""medpeft: compare parameter-efficient fine-tuning methods on medical images, then use the winner."""

__version__ = "0.1.0"
