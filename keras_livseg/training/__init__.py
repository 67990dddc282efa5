"""training stage of keras_livseg."""
