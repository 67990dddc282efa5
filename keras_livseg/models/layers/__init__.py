"""Custom layers of the three networks, each registered for ``.keras`` serialization.

- :class:`TumorAttention` — the TAM of TAM-U-Net.
- :class:`SqueezeExcitation` — SE channel attention.
- :class:`ASPP` — atrous spatial pyramid pooling (rates 6, 12, 18 + image pooling).
- :class:`FeaturePyramidAttention`, :class:`GlobalAttentionUpsample` — the two
  modules of the Pyramid Attention Network.
- :class:`ConvBNReLU` — the Conv-BN-ReLU unit they are built from.
"""

from keras_livseg.models.layers._conv_bn import ConvBNReLU
from keras_livseg.models.layers.aspp import ASPP
from keras_livseg.models.layers.feature_pyramid_attention import FeaturePyramidAttention
from keras_livseg.models.layers.global_attention_upsample import GlobalAttentionUpsample
from keras_livseg.models.layers.squeeze_excitation import SqueezeExcitation
from keras_livseg.models.layers.tumor_attention import TumorAttention

__all__ = [
    "ASPP",
    "ConvBNReLU",
    "FeaturePyramidAttention",
    "GlobalAttentionUpsample",
    "SqueezeExcitation",
    "TumorAttention",
]
