"""Surgery: every target weight → frozen residual + initialised LoRA factors, with surgery.json.

The library's entry points, the same as the commands of the same names."""

from corda_surgery.surgery.calibration import calibrate
from corda_surgery.surgery.options import Method, SurgeryOptions
from corda_surgery.surgery.run import convert_checkpoint, decompose_checkpoint, estimate_run

__all__ = ["Method", "SurgeryOptions", "calibrate", "convert_checkpoint", "decompose_checkpoint", "estimate_run"]
