"""Built-in model adapters; importing this package registers them."""

from . import hf_encoders  # noqa: F401,E402
from . import hf_inline  # noqa: F401,E402  (BLOOM, GPT-Neo, DeBERTa-v2: inline attention re-implemented)
from . import hf_text  # noqa: F401
from . import hf_vlm  # noqa: F401,E402
from . import nnsight_model  # noqa: F401,E402
from . import tl_bridge  # noqa: F401,E402
from . import (diffusers_cogvideox, diffusers_dit, diffusers_flux,  # noqa: F401,E402  (lazy diffusers); noqa: F401,E402
               diffusers_hunyuan_video, diffusers_pipeline, diffusers_sd3, diffusers_unet, diffusers_wan)
