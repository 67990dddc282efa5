"""keras_livseg: liver and liver-tumor segmentation of abdominal CT in Keras 3.

Stages (one module each): ``data`` (volumes, phantom, preprocessing, shards,
tf.data), ``models``, ``training``, ``evaluation``; commands are
``python -m keras_livseg.<verb>``.
"""

import os as _os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX-512 VNNI/BF16 or AMX.
# On an AVX2-only EPYC a TAM-U-Net train step at 256 px ran in 2.7 s with them, 3.4 and 5.5 s in two
# runs without, and without them channels-first convolutions do not run on a CPU at all ("Conv2D only
# supports NHWC"). Set here, the one place, so that the commands, a notebook that imports this
# package before TensorFlow, the benchmarks and the tests all get the same kernels; a value the
# user set is kept, and once TensorFlow is loaded the variable no longer matters.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
