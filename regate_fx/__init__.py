"""regate_fx: ReGATE token elision for any Hugging Face decoder, as a torch.compile graph pass."""

from regate_fx import runtime
from regate_fx.runtime import *  # noqa: F401,F403

__all__ = list(runtime.__all__)
__version__ = "0.1.0"
