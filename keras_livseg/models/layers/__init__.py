"""Custom layers of the networks, each registered for ``.keras`` serialization.

- :class:`TumorAttention` — the TAM of TAM-U-Net.
- :class:`SqueezeExcitation` — SE channel attention.
- :class:`ASPP` — atrous spatial pyramid pooling (rates 6, 12, 18 + image pooling).
- :class:`FeaturePyramidAttention`, :class:`GlobalAttentionUpsample` — the two
  modules of the Pyramid Attention Network.
- :class:`AttentionGate` — the additive attention gate of Attention U-Net (Oktay et al.).
- :class:`CBAM` — channel then spatial attention (Woo et al.), for U-Net+CBAM.
- :class:`PositionAttention`, :class:`MultiscaleFusionAttention` — MA-Net's PAB and MFAB.
- :class:`PyramidPooling` — PSPNet's pyramid pooling module (bins 1, 2, 3, 6).
- :class:`ConvBNReLU` — the Conv-BN-ReLU unit they are built from.
"""

from keras_livseg.models.layers._conv_bn import ConvBNReLU
from keras_livseg.models.layers.aspp import ASPP
from keras_livseg.models.layers.attention_gate import AttentionGate
from keras_livseg.models.layers.cbam import CBAM
from keras_livseg.models.layers.feature_pyramid_attention import FeaturePyramidAttention
from keras_livseg.models.layers.global_attention_upsample import GlobalAttentionUpsample
from keras_livseg.models.layers.multiscale_fusion_attention import MultiscaleFusionAttention
from keras_livseg.models.layers.position_attention import PositionAttention
from keras_livseg.models.layers.pyramid_pooling import PyramidPooling
from keras_livseg.models.layers.squeeze_excitation import SqueezeExcitation
from keras_livseg.models.layers.tumor_attention import TumorAttention

__all__ = [
    "ASPP",
    "AttentionGate",
    "CBAM",
    "ConvBNReLU",
    "FeaturePyramidAttention",
    "GlobalAttentionUpsample",
    "MultiscaleFusionAttention",
    "PositionAttention",
    "PyramidPooling",
    "SqueezeExcitation",
    "TumorAttention",
]
