"""HTTP serving on loopback: :class:`PredictionServer` answers predictions at a width or within a latency budget."""

from ._decode import BadRequest, decode_image, decode_tensor
from .server import PredictionServer, check_loopback

__all__ = ["BadRequest", "PredictionServer", "check_loopback", "decode_image", "decode_tensor"]
