"""keras_livseg: liver and liver-tumor segmentation of abdominal CT in Keras 3.

Stages (one module each): ``data`` (volumes, phantom, preprocessing, shards,
tf.data), ``models``, ``training``, ``evaluation``; commands are
``python -m keras_livseg.<verb>``.
"""

__version__ = "0.1.0"
