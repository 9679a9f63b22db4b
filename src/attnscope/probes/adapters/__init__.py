"""Built-in model adapters; importing this package registers them."""

from . import hf_text  # noqa: F401
from . import diffusers_dit, diffusers_pipeline, diffusers_sd3, diffusers_unet  # noqa: F401,E402  (lazy diffusers)
from . import hf_vlm  # noqa: F401,E402
from . import tl_bridge  # noqa: F401,E402
from . import nnsight_model  # noqa: F401,E402
