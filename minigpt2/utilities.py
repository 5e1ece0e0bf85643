"""TransformerLens 4's name for its utils (``import transformer_lens.utilities as utils``): minigpt2.utils itself."""

import sys

from . import utils as _utils

sys.modules[__name__] = _utils
